"""Shared test helpers: real data from ../shared/data, skipped with a message when absent (failed in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lib import config


def shared(*parts: str) -> Path:
    """Path under ../shared/data; skip when it is missing, but fail in CI where it always exists."""
    path = config.shared_path(*parts)
    if not path.exists():
        msg = f"real test data not found: {path} (expected ../shared/data beside the repository)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def smoke_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic cohort generated once per test session."""
    from lib import synth

    return synth.ensure_cohort("smoke", config.DEFAULT_SEED, root=tmp_path_factory.mktemp("cohort"))


def secondary_capture(modality: str = "OT"):
    """A minimal pydicom secondary-capture dataset (file meta, UIDs, modality); tests add pixel tags and data."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    return ds
