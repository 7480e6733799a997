"""The site's tamper-evident audit log (see :mod:`fedeid.audit.log`)."""

from fedeid.audit.log import AuditLog, record, state_dir

__all__ = ["AuditLog", "record", "state_dir"]
