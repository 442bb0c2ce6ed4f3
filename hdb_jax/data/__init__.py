"""Data sources: synthetic faces and image-folder loading."""
