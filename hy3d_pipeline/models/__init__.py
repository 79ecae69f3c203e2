"""Generated 3D models: the generator backends, mesh export, and the asset that produces `models_3d`."""
