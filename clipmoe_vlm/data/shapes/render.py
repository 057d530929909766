"""Drawing scenes as images, and the exact PNG/JPEG encodings the generated files use."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from .world import DEFAULT_CONFIG, RGB, SUPPORTED_SHAPES, Scene, ShapeObject, ShapesConfig, _check_image_size


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` with radius ``r``, vertically centered on its bounding box."""
    points = _raw_polygon(shape, cx, cy, r)
    ys = [y for _, y in points]
    shift = cy - (min(ys) + max(ys)) / 2
    return [(x, y + shift) for x, y in points]


def _raw_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        big = 1.2 * r
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return [(cx + big * float(np.cos(a)), cy + big * float(np.sin(a))) for a in angles]
    if shape == "diamond":
        big = 1.05 * r
        return [(cx, cy - big), (cx + big, cy), (cx, cy + big), (cx - big, cy)]
    if shape == "cross":
        a, w = r, 0.4 * r
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
            (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
            (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    if shape == "star":
        points = []
        for k in range(10):
            radius = 1.1 * r if k % 2 == 0 else 0.47 * r
            angle = np.deg2rad(-90.0 + 36.0 * k)
            points.append((cx + radius * float(np.cos(angle)), cy + radius * float(np.sin(angle))))
        return points
    raise ValueError(f"cannot draw shape {shape!r}; supported: {list(SUPPORTED_SHAPES)}")


def object_rgb(obj: ShapeObject, config: ShapesConfig | None = None) -> RGB:
    """The RGB an object is drawn with: its color's base value plus its jitter."""
    config = config or DEFAULT_CONFIG
    base = config.color_rgb[obj.color]
    return tuple(int(min(255, max(0, b + d))) for b, d in zip(base, obj.color_delta))  # type: ignore[return-value]


def render_scene(scene: Scene, image_size: int = 64, config: ShapesConfig | None = None) -> Image.Image:
    """Draw a scene as an RGB image (supersampled, then box-filtered, so edges are anti-aliased)."""
    config = config or DEFAULT_CONFIG
    image_size = _check_image_size(image_size)
    side = image_size * config.supersample
    canvas = Image.new("RGB", (side, side), tuple(config.background))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        ax, ay = config.anchors[obj.position]
        cx, cy = (ax + obj.offset[0]) * side, (ay + obj.offset[1]) * side
        r = config.size_radius[obj.size] * side
        rgb = object_rgb(obj, config)
        width = max(config.supersample, round(config.outline_width * r))  # at least one output pixel
        filled = obj.fill == "filled"
        if obj.shape == "circle":
            box = (cx - r, cy - r, cx + r, cy + r)
            if filled:
                draw.ellipse(box, fill=rgb)
            else:
                draw.ellipse(box, outline=rgb, width=width)
        else:
            points = _polygon(obj.shape, cx, cy, r)
            if filled:
                draw.polygon(points, fill=rgb)
            else:
                draw.polygon(points, outline=rgb, width=width)
    if config.supersample == 1:
        return canvas
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()
