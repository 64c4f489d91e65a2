"""Sample files shipped with napari-masam (see README.txt for sources and licences)."""
