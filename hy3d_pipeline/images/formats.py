"""Which objects are images by name. Light on purpose: the sensor filters listings with it on every tick,
before any image library is imported. Content is checked later, in `validation`."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def has_image_extension(key: str) -> bool:
    return key.lower().endswith(IMAGE_EXTENSIONS)
