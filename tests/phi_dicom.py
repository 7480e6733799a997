"""PHI-laden DICOM files for tests: identifiers in the header, the file name and the folder name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

PHI = {"PatientName": "Quixote^Dulcinea", "PatientID": "MRN-88231-QX", "AccessionNumber": "ACC77341",
       "InstitutionName": "Hospital Santa Lucia", "ReferringPhysicianName": "Sancho^Panza",
       "PatientBirthDate": "19470312", "StudyDate": "20210805"}


def phi_dicom(path: Path, i: int) -> list[str]:
    """A small CR image with identifiers in its header; returns every identifying value written."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    for k, v in PHI.items():
        setattr(ds, k, f"{v}{i}" if k in ("PatientID", "AccessionNumber") else v)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BurnedInAnnotation = "CR", "NO"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(i).integers(0, 4096, (32, 32), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return [str(ds.PatientID), str(ds.AccessionNumber), ds.StudyInstanceUID, ds.SeriesInstanceUID,
            ds.SOPInstanceUID, path.name, path.stem]
