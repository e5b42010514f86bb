"""Folder watching: acquisitions on disk, their completeness, and the watchers that queue them."""
