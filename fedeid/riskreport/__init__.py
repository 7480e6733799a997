"""The re-identification risk report a privacy officer signs (``fedeid report``)."""
