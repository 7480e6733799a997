"""PHI-laden DICOM inputs for the de-identification acceptance tests.

Names in Latin-1 and UTF-8 (CJK) character sets, SR text quoting the patient, graphic text,
identifiers only inside sequences, private and unknown tags (one of VR PN), dates in several
written forms, and files and folders named by UIDs, names and study dates.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

STUDY_DATE = "20240117"
SR_DATE = "19910805"  # an SR DATE content item, equal to the CJK patient's birth date
# Every value below that identifies someone; the tests search outputs for each in every encoding.
IDENTIFIERS = (
    "Müller",
    "Lüdenscheidt",
    "Jürgen",
    "Peña",
    "Carlos",
    "王小明",
    "小明",
    "MRN-0012345",
    "0012345",
    "ALT-998877",
    "ZH-7788",
    "HOSP-A",
    "19580317",
    "17.03.1958",
    "1991年8月5日",
    "19910805",
    "29/01/1977",
    "5551234",
    "1.2.3.999.888",
    "Hauptstraße",
)


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _code(value: str, meaning: str) -> Sequence:
    return Sequence([_item(CodeValue=value, CodingSchemeDesignator="DCM", CodeMeaning=meaning)])


def _base(sop_class: str, charset: str, name: str, pid: str, birth: str, uids: list[str]) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    uids += [ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID]
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = birth
    ds.PatientAddress = "Hauptstraße 5, Köln"
    ds.StudyDate = STUDY_DATE
    ds.Modality = "CR"
    return ds


def _image(ds: Dataset) -> None:
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(64)


def _save(ds: Dataset, path: Path) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def make_phi_tree(root: Path) -> list[str]:
    """Write the PHI corpus under ``root``; return the original UIDs it holds (also PHI)."""
    uids: list[str] = ["1.2.3.999.888"]
    # A CR in Latin-1: hyphenated name, IDs in sequences, unknown and private tags, graphic text.
    cr = _base("1.2.840.10008.5.1.4.1.1.1", "ISO_IR 100", "Müller-Lüdenscheidt^Jürgen", "MRN-0012345", "19580317", uids)
    _image(cr)
    cr.IssuerOfPatientID = "HOSP-A"
    cr.IssuerOfPatientIDQualifiersSequence = Sequence([_item(UniversalEntityID="1.2.3.999.888")])
    cr.OtherPatientIDsSequence = Sequence([_item(PatientID="ALT-998877")])
    cr.StudyDescription = "Thorax Müller, geb. 17.03.1958, MRN-0012345"
    cr.ImageComments = "Jürgen Johnny Müller-Lüdenscheidt, 1958-03-17, tel +49 221 5551234"
    cr.ScheduledProcedureStepSequence = Sequence(
        [
            _item(
                ScheduledPerformingPhysicianName="Peña^Carlos",
                CommentsOnTheScheduledProcedureStep="call Jürgen Müller on 0221 5551234",
            )
        ]
    )
    cr.add_new(0x00420110, "PN", "Müller^Jürgen")  # an unknown public tag of VR PN
    cr.add_new(0x00440120, "LO", "ALT-998877")  # an unknown public tag of VR LO
    cr.add_new(0x00190010, "LO", "ACME 1.1")
    cr.add_new(0x00191001, "LO", "Müller Jürgen MRN-0012345")
    cr.GraphicAnnotationSequence = Sequence(
        [
            _item(
                GraphicLayer="LAYER1",
                TextObjectSequence=Sequence(
                    [
                        _item(
                            UnformattedTextValue="Müller 17.03.1958",
                            AnchorPointAnnotationUnits="PIXEL",
                            AnchorPoint=[1.0, 1.0],
                            AnchorPointVisibility="N",
                        )
                    ]
                ),
            )
        ]
    )
    _save(cr, root / "MULLER-LUDENSCHEIDT_JURGEN" / STUDY_DATE / f"CR_{cr.SOPInstanceUID}.dcm")

    # The same patient by Patient ID, without an issuer: one pseudonym, one date shift.
    mr = _base("1.2.840.10008.5.1.4.1.1.4", "ISO_IR 100", "Müller^Jürgen", "MRN-0012345", "19580317", uids)
    _image(mr)
    mr.Modality = "MR"
    mr.StudyDate = "20240120"
    _save(mr, root / "MULLER-LUDENSCHEIDT_JURGEN" / f"CT.{mr.SOPInstanceUID}.dcm")

    # A CJK name in UTF-8 and a Basic Text SR quoting the patient in several date forms.
    sr = _base("1.2.840.10008.5.1.4.1.1.88.11", "ISO_IR 192", "王^小明", "ZH-7788", "19910805", uids)
    sr.Modality = "SR"
    sr.ValueType = "CONTAINER"
    sr.ConceptNameCodeSequence = _code("11528-7", "Radiology Report")
    sr.ContinuityOfContent = "SEPARATE"
    text = "患者王小明，生于1991年8月5日，ID ZH-7788；Kontakt: Peña, 29/01/1977, UID 1.2.3.999.888"
    sr.ContentSequence = Sequence(
        [
            _item(RelationshipType="CONTAINS", ValueType="TEXT", ConceptNameCodeSequence=_code("121071", "Finding"),
                  TextValue=text),
            _item(RelationshipType="HAS OBS CONTEXT", ValueType="PNAME",
                  ConceptNameCodeSequence=_code("121008", "Person Observer Name"), PersonName="Peña^Carlos"),
            _item(RelationshipType="CONTAINS", ValueType="DATE", ConceptNameCodeSequence=_code("111060", "Study Date"),
                  Date=SR_DATE),
        ]
    )
    _save(sr, root / "王小明" / f"{sr.SOPInstanceUID}.dcm")
    return uids
