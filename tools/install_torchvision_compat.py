"""Install tools/torchvision_compat.py into the current interpreter's site-packages (see its docstring).

Run by ``make env``. Idempotent. On a matching torch/torchvision build the hook stays inert.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    shutil.copyfile(HERE / "torchvision_compat.py", site / "_torchvision_compat.py")
    (site / "_torchvision_compat.pth").write_text("import _torchvision_compat; _torchvision_compat.install()\n")
    print(f"torchvision compatibility hook installed in {site}")


if __name__ == "__main__":
    main()
