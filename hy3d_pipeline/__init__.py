"""hy3d-pipeline: images in S3 -> 3D models with Hunyuan3D-2, orchestrated by Dagster.

`defs` is the code location. Importing the package loads dagster and our definitions only; torch, hy3dgen and
image libraries are imported when a run actually generates.
"""

from hy3d_pipeline.core import generate_3d_from_image_core
from hy3d_pipeline.definitions import defs
from hy3d_pipeline.s3.urls import S3Location, S3UrlError, is_s3_url, parse_s3_url

__all__ = ["S3Location", "S3UrlError", "defs", "generate_3d_from_image_core", "is_s3_url", "parse_s3_url"]
