"""mednb: report-supervised anomaly detection in CT, and the same stages for 2D sets, as notebooks + library."""

import sys

# MONAI imports jsonschema, which builds an IRI grammar at import when rfc3987-syntax is installed: about 4 s of
# CPU in every process (notebook kernels, fold and case workers). Nothing here validates IRI formats, and
# jsonschema skips that format check when the module cannot be imported.
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]
