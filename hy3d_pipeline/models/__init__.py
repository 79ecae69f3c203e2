"""Generated 3D models: the step that makes `models_3d` (assets.py), one image's processing (processing.py), the
generator backends, export, checks and pictures."""
