"""Which objects are images by name. Light on purpose: the sensor filters listings with it on every tick,
before any image library is imported. Content is checked later, in `validation`."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def has_image_extension(key: str) -> bool:
    return key.lower().endswith(IMAGE_EXTENSIONS)

# the Content-Type an image object is stored with, by the format its content was recognised as
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp", "TIFF": "image/tiff", "WEBP": "image/webp"}
_EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                      ".webp": "WEBP"}


def content_type_for_name(key: str) -> str:
    """The Content-Type a name's extension suggests (for bytes whose format we made ourselves)."""
    suffix = key[key.rfind("."):].lower() if "." in key else ""
    return CONTENT_TYPES.get(_EXTENSION_FORMATS.get(suffix, ""), "application/octet-stream")
