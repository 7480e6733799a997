"""DICOM de-identification: pixels through the model, headers by the PS3.15 Annex E profile."""
