"""backupfs: browse and restore files from image-level backups served over HTTP."""

__version__ = "0.1.0"
