"""watchfolder: get microscope acquisitions from drop folders and HTTP clients into OMERO."""

__version__ = "0.1.0"
