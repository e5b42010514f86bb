"""The OMERO side of the ``omero`` importer, run in a child process.

``child.py`` is started by file path with an interpreter that has omero-py
(often Python 3.10, see ``scripts/omero-env``). It imports nothing from the
watchfolder package, only the standard library and omero-py, so this package
file stays empty on purpose.
"""
