"""Fast, deterministic renderer of synthetic frontal chest radiographs ("phantoms").

Coordinates are normalised: x and y run from -1 to 1 across the image, +x is the image right
(the patient's left) and +y points down. Bright means dense. Everything random comes from the
``numpy.random.Generator`` passed in, so an image is a pure function of its inputs and the
generator's state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from hf_datasets.labels import OBSERVATIONS

__all__ = [
    "OBSERVATIONS",
    "VIEWS",
    "Anatomy",
    "cardiothoracic_ratio",
    "render",
    "sample_anatomy",
    "vary_study",
]

VIEWS: tuple[str, ...] = ("PA", "AP")

_F32 = np.float32
_UNCERTAIN_SEVERITY = 0.5
_ANATOMY_MAX = 236.0  # grey level that anatomy never exceeds; devices go above it
_DEVICE_LEVEL = 252.0
_AIR_LEVEL = 14.0
_VESSEL_GAIN = np.array([0.8, 0.75, 0.6, 0.45, 0.34, 0.25])


@dataclass(frozen=True)
class Anatomy:
    """Body geometry and appearance of one synthetic patient and study.

    Lengths are in normalised image units (the image spans -1..1); ``_r``/``_l`` are the
    patient's right (image left) and left (image right). The study fields (shift, rotation,
    scale, inspiration, exposure, contrast, noise) are what :func:`vary_study` changes;
    ``texture_seed`` fixes the patient's own pulmonary vessel pattern.
    """

    body_width: float
    neck_width: float
    shoulder_y: float
    soft_tissue: float
    breast: float
    lung_width_r: float
    lung_width_l: float
    apex_y: float
    costophrenic_y: float
    dome_r: float
    dome_l: float
    mediastinum_width: float
    aortic_knob: float
    hilum_y: float
    heart_width: float
    heart_height: float
    heart_left_fraction: float  # share of the cardiac width left of the midline
    rib_spacing: float
    rib_first_y: float
    rib_curve: float
    rib_width: float
    bone_density: float
    stomach_gas: float
    shift_x: float
    shift_y: float
    rotation: float
    scale: float
    inspiration: float
    exposure: float
    contrast: float
    noise: float
    texture_seed: int


def sample_anatomy(
    rng: np.random.Generator, sex: str | None = None, age: int | None = None
) -> Anatomy:
    """Random anatomy for one patient (sex shifts habitus and breasts; age bones and aorta)."""
    if sex is None:
        sex = "F" if rng.random() < 0.5 else "M"
    if sex not in ("F", "M"):
        raise ValueError(f"sex must be 'F', 'M' or None, got {sex!r}")
    if age is None:
        age = int(rng.integers(18, 91))
    male = sex == "M"
    old = float(np.clip((age - 40) / 45.0, 0.0, 1.0))
    u = rng.uniform
    lung_w = u(0.83, 0.92) if male else u(0.80, 0.89)
    apex = u(-0.80, -0.70)
    cp = u(0.56, 0.68)
    dome_r = cp - u(0.15, 0.22)
    ctr = u(0.38, 0.45) + 0.02 * old
    asym = u(-0.02, 0.02)
    hilum = u(-0.22, -0.12)
    return Anatomy(
        body_width=lung_w + (u(0.1, 0.25) if male else u(0.08, 0.2)),
        neck_width=u(0.30, 0.36) if male else u(0.27, 0.32),
        shoulder_y=u(-1.12, -0.98),
        soft_tissue=u(0.9, 1.1),
        breast=0.0 if male else u(0.5, 1.0),
        lung_width_r=lung_w + asym,
        lung_width_l=lung_w - asym,
        apex_y=apex,
        costophrenic_y=cp,
        dome_r=dome_r,
        dome_l=dome_r + u(0.02, 0.06),
        mediastinum_width=u(0.12, 0.15),
        aortic_knob=u(0.025, 0.04) + 0.015 * old,
        hilum_y=hilum,
        heart_width=ctr * lung_w,
        heart_height=dome_r - hilum + u(-0.04, 0.02),
        heart_left_fraction=u(0.6, 0.7),
        rib_spacing=u(0.12, 0.135),
        rib_first_y=apex + u(-0.02, 0.02),
        rib_curve=u(0.65, 0.8),
        rib_width=u(0.029, 0.035),
        bone_density=u(0.9, 1.1) - 0.25 * old,
        stomach_gas=u(0.0, 1.0),
        shift_x=u(-0.02, 0.02),
        shift_y=u(-0.02, 0.03),
        rotation=u(-0.02, 0.02),
        scale=u(0.97, 1.03),
        inspiration=0.0,
        exposure=u(-0.06, 0.06),
        contrast=u(0.9, 1.1),
        noise=u(0.6, 1.4),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def vary_study(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Same patient, another study: new positioning, inspiration depth and exposure."""
    u = rng.uniform
    return replace(
        anatomy,
        shift_x=float(np.clip(anatomy.shift_x + u(-0.03, 0.03), -0.06, 0.06)),
        shift_y=float(np.clip(anatomy.shift_y + u(-0.03, 0.03), -0.05, 0.07)),
        rotation=float(np.clip(anatomy.rotation + u(-0.03, 0.03), -0.06, 0.06)),
        scale=float(np.clip(anatomy.scale * u(0.97, 1.03), 0.92, 1.08)),
        inspiration=u(-0.05, 0.04),
        exposure=u(-0.08, 0.08),
        contrast=u(0.85, 1.15),
        noise=u(0.6, 1.5),
    )


# ----------------------------------------------------------------------------- caches


def _flush(m: np.ndarray) -> np.ndarray:
    """float32 copy with negligible entries zeroed (float32 denormals make matmuls crawl)."""
    return np.where(np.abs(m) < 1e-7, 0.0, m).astype(_F32)


@lru_cache(maxsize=16)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates (x, y) as 2-D float32 arrays."""
    t = ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0).astype(_F32)
    return np.broadcast_to(t[None, :], (size, size)), np.broadcast_to(t[:, None], (size, size))


@lru_cache(maxsize=64)
def _blur_matrix(size: int, sigma_px: float) -> np.ndarray:
    """Row-normalised Gaussian blur matrix; blur(img) = G @ img @ G.T."""
    i = np.arange(size, dtype=np.float64)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma_px) ** 2)
    g /= g.sum(axis=1, keepdims=True)
    return _flush(g)


@lru_cache(maxsize=64)
def _low_rank_blur(size: int, sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Factors (U, D) of a wide Gaussian blur: Gaussian downsampling D, linear upsampling U."""
    step = max(1, int(sigma_px / 1.5))
    centres = np.arange(0.0, size - 1 + step, step, dtype=np.float64)
    i = np.arange(size, dtype=np.float64)
    d = np.exp(-0.5 * ((centres[:, None] - i[None, :]) / sigma_px) ** 2)
    d /= d.sum(axis=1, keepdims=True)
    up = np.clip(1.0 - np.abs(i[:, None] - centres[None, :]) / step, 0.0, None)
    up /= up.sum(axis=1, keepdims=True)
    return _flush(up), _flush(d)


@lru_cache(maxsize=64)
def _blur_taps(sigma_px: float) -> np.ndarray:
    """Normalised 1-D Gaussian kernel."""
    r = max(1, math.ceil(3.0 * sigma_px))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    return (k / k.sum()).astype(_F32)


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur (edges replicated) with the given sigma in pixels."""
    sigma_px = round(float(sigma_px), 2)
    n = img.shape[0]
    if sigma_px <= 1.0:
        taps = _blur_taps(sigma_px)
        r = taps.size // 2
        p = np.pad(img, r, mode="edge")
        rows = taps[0] * p[: p.shape[0] - 2 * r]
        for k in range(1, taps.size):
            rows += taps[k] * p[k : k + n]
        out = taps[0] * rows[:, :n]
        for k in range(1, taps.size):
            out += taps[k] * rows[:, k : k + n]
        return out
    if sigma_px >= 4.0:
        up, down = _low_rank_blur(n, sigma_px)
        return up @ (down @ img @ down.T) @ up.T
    g = _blur_matrix(n, sigma_px)
    return g @ img @ g.T


@lru_cache(maxsize=32)
def _noise_basis(size: int, n: int) -> np.ndarray:
    """Gaussian basis (size, n) for smooth random fields; field = B @ Z @ B.T."""
    t = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    c = np.linspace(-1.1, 1.1, n)
    step = c[1] - c[0]
    b = np.exp(-0.5 * ((t[:, None] - c[None, :]) / step) ** 2)
    b /= np.sqrt((b**2).sum(axis=1, keepdims=True))
    return _flush(b)


def _smooth_noise(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """Smooth zero-mean, roughly unit-variance random field with about n blobs across."""
    b = _noise_basis(size, n)
    z = rng.standard_normal((n, n), dtype=_F32)
    return b @ z @ b.T


# ----------------------------------------------------------------------------- primitives


def _gauss(tx: np.ndarray, ty: np.ndarray | float = 0.0) -> np.ndarray:
    """exp(-(tx^2 + ty^2)), flushed to zero far out (float32 denormals are slow)."""
    return np.exp(-np.minimum(tx * tx + ty * ty, 60.0))


def _ramp(d: np.ndarray, e: float) -> np.ndarray:
    """Antialiased inside-indicator of a signed distance d (positive inside), edge width e."""
    return np.clip(d * (1.0 / e) + 0.5, 0.0, 1.0)


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, e: float
) -> np.ndarray:
    """Soft mask of an axis-aligned ellipse."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return _ramp((1.0 - r) * min(ax, ay), e)


def _segment_distance(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> np.ndarray:
    """Distance of every point to the segment p0-p1."""
    vx, vy = p1[0] - p0[0], p1[1] - p0[1]
    wx, wy = x - p0[0], y - p0[1]
    t = np.clip((wx * vx + wy * vy) / (vx * vx + vy * vy + 1e-12), 0.0, 1.0)
    return np.sqrt((wx - t * vx) ** 2 + (wy - t * vy) ** 2)


class _Frame:
    """Pixel geometry of one render: anatomical coordinates of every pixel and transforms."""

    def __init__(self, anatomy: Anatomy, size: int):
        self.size = size
        self.px = 2.0 / size
        self.e = 0.9 * self.px
        c, s = math.cos(anatomy.rotation), math.sin(anatomy.rotation)
        self.cos, self.sin, self.scale = c, s, anatomy.scale
        self.sx, self.sy = anatomy.shift_x, anatomy.shift_y
        gx, gy = _pixel_grid(size)
        dx, dy = gx - _F32(self.sx), gy - _F32(self.sy)
        inv = 1.0 / self.scale
        self.x = (c * dx + s * dy) * _F32(inv)
        self.y = (-s * dx + c * dy) * _F32(inv)
        self.u = np.abs(self.x)
        self.left = self.x > 0  # image right = patient's left

    def side(self, right_val: float, left_val: float) -> np.ndarray:
        """Per-pixel parameter: right_val on the image left half, left_val on the image right."""
        return np.where(self.left, _F32(left_val), _F32(right_val))

    def to_pixels(self, ax: np.ndarray, ay: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Continuous (column, row) pixel coordinates of anatomical points."""
        x = self.scale * (self.cos * ax - self.sin * ay) + self.sx
        y = self.scale * (self.sin * ax + self.cos * ay) + self.sy
        return (x + 1.0) * 0.5 * self.size - 0.5, (y + 1.0) * 0.5 * self.size - 0.5

    def splat(
        self,
        ax: np.ndarray,
        ay: np.ndarray,
        w: np.ndarray | float,
        layer: np.ndarray | int = 0,
        n_layers: int = 1,
    ) -> np.ndarray:
        """Accumulate weighted points (anatomical coords) into image layers (bilinear splats)."""
        n, m = self.size, self.size + 2
        col, row = self.to_pixels(np.asarray(ax, np.float64), np.asarray(ay, np.float64))
        w = np.broadcast_to(np.asarray(w, np.float64), col.shape)
        layer = np.broadcast_to(np.asarray(layer, np.int64), col.shape)
        c0, r0 = np.floor(col), np.floor(row)
        fc, fr = col - c0, row - r0
        inside = (c0 >= -1) & (c0 < n) & (r0 >= -1) & (r0 < n)
        w = np.where(inside, w, 0.0)
        c0 = np.clip(c0, -1, n - 1).astype(np.int64)
        r0 = np.clip(r0, -1, n - 1).astype(np.int64)
        idx = layer * (m * m) + (r0 + 1) * m + (c0 + 1)
        acc = np.bincount(
            np.concatenate([idx, idx + 1, idx + m, idx + m + 1]),
            np.concatenate(
                [w * (1 - fr) * (1 - fc), w * (1 - fr) * fc, w * fr * (1 - fc), w * fr * fc]
            ),
            minlength=n_layers * m * m,
        )
        return acc.reshape(n_layers, m, m)[:, 1:-1, 1:-1].astype(_F32)


# ----------------------------------------------------------------------------- findings


def _severity(value: float | None) -> float:
    """Rendering strength of a label value: 1 positive, 0.5 uncertain, 0 absent."""
    if value is None:
        return 0.0
    v = float(value)
    if math.isnan(v) or v == 0.0:
        return 0.0
    return 1.0 if v > 0 else _UNCERTAIN_SEVERITY


def _severities(findings: Mapping[str, float | None]) -> dict[str, float]:
    """Severity of every observation; unknown names are an error."""
    unknown = set(findings) - set(OBSERVATIONS)
    if unknown:
        raise ValueError(f"unknown observations: {sorted(unknown)}")
    return {name: _severity(findings.get(name)) for name in OBSERVATIONS}


def _pick_sides(rng: np.random.Generator, p_both: float) -> tuple[int, ...]:
    """Random hemithorax choice: (-1,) image left, (1,) image right, or both."""
    if rng.random() < p_both:
        return (-1, 1)
    return (-1,) if rng.random() < 0.5 else (1,)


@dataclass
class _Plan:
    """Randomised placement of every finding present in one render."""

    sev: dict[str, float]
    heart_scale: tuple[float, float] = (1.0, 1.0)
    mediastinum_scale: float = 1.0
    dome_raise: tuple[float, float] = (0.0, 0.0)
    effusion: tuple[tuple[int, float], ...] = ()
    pneumothorax: tuple[tuple[int, float], ...] = ()


def _plan_findings(sev: dict[str, float], rng: np.random.Generator) -> _Plan:
    """Draw the geometry-changing parts of findings (heart, mediastinum, domes, pleura)."""
    plan = _Plan(sev=sev)
    s = sev["Cardiomegaly"]
    if s:
        plan.heart_scale = (1.0 + s * rng.uniform(0.28, 0.42), 1.0 + s * rng.uniform(0.08, 0.18))
    s = sev["Enlarged Cardiomediastinum"]
    if s:
        plan.mediastinum_scale = 1.0 + s * rng.uniform(0.55, 0.85)
    s = sev["Atelectasis"]
    if s and rng.random() < 0.5:
        raise_ = s * rng.uniform(0.05, 0.10)
        plan.dome_raise = (raise_, 0.0) if rng.random() < 0.5 else (0.0, raise_)
    s = sev["Pleural Effusion"]
    if s:
        plan.effusion = tuple((side, s * rng.uniform(0.25, 0.5)) for side in _pick_sides(rng, 0.35))
    s = sev["Pneumothorax"]
    if s:
        plan.pneumothorax = tuple(
            (side, s * rng.uniform(0.13, 0.26)) for side in _pick_sides(rng, 0.05)
        )
    return plan


# ----------------------------------------------------------------------------- anatomy layers


class _Scene:
    """Anatomical masks and density layers of one render."""

    def __init__(self, a: Anatomy, view: str, f: _Frame, plan: _Plan):
        self.a, self.f, self.plan, self.ap = a, f, plan, view == "AP"
        insp = a.inspiration - (0.05 if self.ap else 0.0)
        self.dome_r = a.dome_r - insp - plan.dome_raise[0]
        self.dome_l = a.dome_l - insp - plan.dome_raise[1]
        self.cp_r = a.costophrenic_y - 0.8 * insp - 0.5 * plan.dome_raise[0]
        self.cp_l = a.costophrenic_y - 0.8 * insp - 0.5 * plan.dome_raise[1]
        self.lung_geometry()

    def lung_geometry(self) -> None:
        """Lateral/medial/apical/diaphragmatic borders and the lung field mask."""
        a, f = self.a, self.f
        y, u = f.y, f.u
        self.W = f.side(a.lung_width_r, a.lung_width_l)
        cp = f.side(self.cp_r, self.cp_l)
        dome = f.side(self.dome_r, self.dome_l)
        yc = cp - 0.08
        b = yc - a.apex_y + 0.14
        t = np.minimum(y - yc, 0.0) / b
        self.lateral = self.W * np.sqrt(np.maximum(1.0 - t * t, 0.0))
        ua = 0.42 * self.W
        self.top = a.apex_y + 1.1 * ((u - ua) / self.W) ** 2
        self.medial = self.mediastinum_border()
        ud = 0.48 * self.W
        tl = np.maximum(u - ud, 0.0) / (self.W - ud)
        tm = np.maximum(ud - u, 0.0) / ud
        self.dia = dome + (cp - dome) * tl**2.4 + 0.07 * tm**2
        e = f.e
        self.lung = (
            _ramp(self.lateral - u, e)
            * _ramp(u - self.medial, e)
            * _ramp(y - self.top, 1.5 * e)
            * _ramp(self.dia - y, e)
        )
        self.heart = self.heart_mask()

    def mediastinum_border(self) -> np.ndarray:
        """Half-width of the mediastinum per pixel row and side, aortic knob included."""
        a, f = self.a, self.f
        m = a.mediastinum_width * self.plan.mediastinum_scale
        width = f.side(m, m * 0.92) * (0.88 + 0.12 * np.clip((f.y - a.apex_y) / 0.5, 0.0, 1.0))
        knob_y = a.hilum_y - 0.2
        kt = (f.y - knob_y) / 0.09
        knob = a.aortic_knob * np.sqrt(np.maximum(1.0 - kt * kt, 0.0))
        return width + np.where(f.left, knob, _F32(0.0))

    def heart_mask(self) -> np.ndarray:
        """Cardiac silhouette: left-ventricular and right-atrial arcs resting on the diaphragm."""
        a, f = self.a, self.f
        sx, sy = self.plan.heart_scale
        if self.ap:
            sx, sy = sx * 1.12, sy * 1.04
        total = 2.0 * a.heart_width * sx
        w_lv = total * a.heart_left_fraction
        w_ra = total - w_lv
        insp = a.inspiration - (0.05 if self.ap else 0.0)
        cy = min(a.dome_r, a.dome_l) - insp - 0.05
        top = cy - a.heart_height * sy
        self.heart_cy, self.heart_top = cy, top
        e = 1.2 * f.e
        a_lv = 0.62 * w_lv + 0.3 * w_ra
        lv = _upper_ellipse(f.x, f.y, w_lv - a_lv, cy, a_lv, cy - top, e)
        a_ra = 0.45 * w_ra
        ra = _upper_ellipse(f.x, f.y, a_ra - w_ra, cy - 0.04, a_ra, 0.7 * (cy - top), e)
        return np.maximum(lv, ra)


def _upper_ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, e: float
) -> np.ndarray:
    """Soft mask of an ellipse's upper half continued straight down below its centre."""
    dy = np.minimum(y - cy, 0.0) / ay
    r = np.sqrt(((x - cx) / ax) ** 2 + dy * dy)
    return _ramp((1.0 - r) * ax, e)


# ----------------------------------------------------------------------------- vessels


def _vessel_tree(seed: int, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Branching, gently curving vessel segments at the hilum: starts, ends, generation, gain."""
    rng = np.random.default_rng([seed, side + 7])
    base = np.array([-1.65, -1.2, -0.75, -0.3, 0.15, 0.6, 1.05, 1.45])
    ang = base + rng.uniform(-0.15, 0.15, base.size)
    length = 0.13 * rng.uniform(0.8, 1.2, ang.size)
    start = np.stack([rng.uniform(-0.01, 0.03, ang.size), 0.09 * np.sin(base)], axis=1)
    starts, ends, gens = [], [], []
    for g in range(6):
        for _ in range(3):
            ang = ang + rng.normal(0.0, 0.07, ang.size)
            end = start + (length / 3.0)[:, None] * np.stack([np.cos(ang), np.sin(ang)], axis=1)
            starts.append(start)
            ends.append(end)
            gens.append(np.full(ang.size, g))
            start = end
        n = ang.size
        spread = rng.uniform(0.22, 0.45, n)
        ang = np.concatenate([ang - spread * rng.uniform(0.3, 1.0, n), ang + spread])
        length = np.concatenate([length, length]) * rng.uniform(0.7, 0.88, 2 * n)
        start = np.concatenate([start, start])
    s, e, g = np.concatenate(starts), np.concatenate(ends), np.concatenate(gens)
    s[:, 0] *= side
    e[:, 0] *= side
    return s, e, g, rng.uniform(0.6, 1.4, g.size)


def _vessels(scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """Density of lung markings from both hila: (central trunks, peripheral branches)."""
    a, f = scene.a, scene.f
    step = 0.5 * f.px
    xs, ys, ws, layers = [], [], [], []
    for side in (-1, 1):
        s, e, g, gain = _vessel_tree(a.texture_seed, side)
        width = (a.lung_width_l if side > 0 else a.lung_width_r) / 0.83
        hx = side * (a.mediastinum_width + 0.08)
        hy = a.hilum_y + (0.0 if side > 0 else 0.03)
        lens = np.hypot(*(e - s).T)
        n = max(2, math.ceil(lens.max() / step))
        t = np.linspace(0.0, 1.0, n, endpoint=False)
        xs.append(hx + width * (s[:, 0, None] + t * (e[:, 0] - s[:, 0])[:, None]))
        ys.append(hy + width * (s[:, 1, None] + t * (e[:, 1] - s[:, 1])[:, None]))
        w = _VESSEL_GAIN[g] * gain * lens / n / f.px
        ws.append(np.broadcast_to(w[:, None], xs[-1].shape))
        layers.append(np.broadcast_to((g >= 2)[:, None], xs[-1].shape))
    canvas = f.splat(
        np.concatenate([x.ravel() for x in xs]),
        np.concatenate([y.ravel() for y in ys]),
        np.concatenate([w.ravel() for w in ws]),
        np.concatenate([k.ravel() for k in layers]).astype(np.int64),
        n_layers=2,
    )
    # widths are physical (normalised units) but never below ~1 px; the gain keeps each
    # vessel's peak density independent of the image size
    # above 128 px the vessels get slightly wider still, so they read as soft shadows
    soft = 1.0 + 0.3 * max(0.0, math.log2(f.size / 128.0))
    sig_big = max(0.9, 0.014 * soft / f.px)
    sig_small = max(0.6, 0.0075 * soft / f.px)
    gain_big = 0.7 * sig_big / max(0.9, 0.014 * 64) / soft
    gain_small = 0.42 * sig_small / max(0.6, 0.0075 * 64) / soft
    return gain_big * _blur(canvas[0], sig_big), gain_small * _blur(canvas[1], sig_small)


# ----------------------------------------------------------------------------- bones


@lru_cache(maxsize=4096)
def _rib_jitter(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-rib height offsets and lateral sweep factors of one patient (13 ribs a side)."""
    rng = np.random.default_rng([seed, 99])
    return (
        rng.normal(0.0, 0.01, 13).astype(_F32),
        rng.uniform(0.85, 1.15, 13).astype(_F32),
    )


def _ribs(
    scene: _Scene, fracture: tuple[int, int, float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior rib arcs (cortical rims, wider spacing lower down), faint anterior ribs, and
    the rib cage margin outside the lungs."""
    a, f = scene.a, scene.f
    u, y, w = f.u, f.y, scene.W
    q = 0.035  # spacing grows by 2q per rib going down
    curve = a.rib_curve * (0.8 if scene.ap else 1.0)
    offset, sweep = _rib_jitter(a.texture_seed)
    # centre line: leaves the spine almost level, then arcs down over the lateral lung
    lat = np.maximum(u / w - 0.5, 0.0) * 2.0
    g0 = -0.16 * u + 0.45 * curve * u * u
    g1 = 0.22 * lat * lat
    ap_shift = 0.04 if scene.ap else 0.0

    def phase_of(yy: np.ndarray, gg: np.ndarray) -> np.ndarray:
        z = (yy - gg - a.rib_first_y - ap_shift) / a.rib_spacing
        return (np.sqrt(np.maximum(1.0 + 4.0 * q * z, 0.0)) - 1.0) / (2.0 * q)

    k0 = np.clip(np.floor(phase_of(y, g0 + g1) + 0.5), 0, 12).astype(np.int64)
    g = g0 + g1 * sweep[k0] + offset[k0]
    phase = phase_of(y, g)
    idx = np.floor(phase + 0.5)
    on_break = None
    if fracture is not None:
        side, k, uf, step = fracture
        on_break = (idx == k) & (f.left if side > 0 else ~f.left)
        shift = step + 0.15 * np.abs(step) / 0.04 * (u - uf)
        phase = phase_of(y - np.where(on_break & (u > uf), shift, _F32(0.0)), g)
    spacing = a.rib_spacing * (1.0 + 2.0 * q * np.clip(idx, 0, 12))
    d = (phase - idx) * spacing
    hw = a.rib_width * (1.0 + 0.025 * np.clip(idx, 0, 12))
    ad = np.abs(d)
    band = _ramp(hw - ad, 1.5 * f.e)
    dens = band * (0.5 + 0.8 * (ad / hw) ** 4)  # cortical rims brighter than the marrow
    extent = _ramp(scene.lateral + 0.06 - u, 3 * f.e) * _ramp(u - 0.07, 0.04)
    extent *= (idx >= 0) & (idx <= 11)
    extent *= 0.15 + 0.85 * _ramp(scene.dia + 0.03 - y, 0.06)
    if on_break is not None:
        gap = _ramp(0.018 - np.abs(u - fracture[2] - 0.3 * d), f.e) * on_break
        dens *= 1.0 - gap
        # periosteal reaction / callus: fusiform thickening around the break
        near = on_break * _gauss((u - fracture[2]) / 0.06)
        dens += 1.3 * near * _ramp(2.0 * hw - ad, 2 * f.e) * (1.0 - gap)
    post = dens * extent
    # anterior ribs: broad, faint, running down and medially from the lateral chest wall
    ya = y + 0.5 * (u - w) - 0.3 * (u - w) ** 2 + (0.06 if scene.ap else 0.0)
    sp = a.rib_spacing * 1.15
    pa = (ya - a.rib_first_y - 0.2) / sp
    da = (pa - np.floor(pa + 0.5)) * sp
    ant = _ramp(0.03 - np.abs(da), 2 * f.e) * _ramp(u - 0.45, 0.15) * _ramp(scene.lateral - u, 0.05)
    ant *= _ramp(scene.dia - y, 0.05)
    # rib cage margin: the ribs' lateral arcs seen edge-on just outside the lung
    cage = _gauss((u - scene.lateral - 0.03) / 0.022) * _ramp(y - a.apex_y - 0.1, 0.15)
    cage *= _ramp(scene.dia + 0.08 - y, 0.08)
    return post + 0.22 * ant, cage


def _clavicles(scene: _Scene) -> np.ndarray:
    """Both clavicles as slightly S-shaped bright bars over the apices."""
    a, f = scene.a, scene.f
    u, y = f.u, f.y
    y0 = a.apex_y + 0.15 - (0.1 if scene.ap else 0.0)
    slope = 0.16 if scene.ap else 0.3
    cy = y0 - slope * u + 0.6 * slope * u * u + 0.02 * np.sin(u * 7.0)
    d = np.abs(y - cy)
    end = scene.W * 0.92
    hw = (0.027 + 0.008 * np.cos(u * 4.0)) * np.sqrt(np.clip((end - u) / 0.1, 0.3, 1.0))
    hw = hw * (1.0 + 0.4 * _gauss((u - 0.1) / 0.05))  # bulbous medial end
    band = _ramp(hw - d, 1.2 * f.e) * _ramp(u - 0.06, 0.02) * _ramp(end - u, 0.04)
    return band * (0.7 + 0.6 * (d / hw) ** 4)


def _spine(scene: _Scene) -> np.ndarray:
    """Vertebral column: bodies with faint end plates and disc spaces, pedicles."""
    a, f = scene.a, scene.f
    x, y = f.x, f.y
    period = a.rib_spacing * 0.9
    ph = (y - a.rib_first_y + 0.03) / period
    fr = ph - np.floor(ph) - 0.5
    half = 0.062 + 0.018 * np.clip((y - a.apex_y) / 1.3, 0.0, 1.0)
    body = _ramp(half - np.abs(x), 0.025) * (1.0 - 0.25 * _gauss(fr / 0.09))
    ped = _gauss(np.hypot(np.abs(x) - 0.8 * half, fr * period * 0.7) / 0.012)
    return 0.3 * body + 0.12 * ped


def _scapulae(scene: _Scene) -> np.ndarray:
    """Scapular shadows; in AP they overlap the lateral upper lungs."""
    a, f = scene.a, scene.f
    u, y = f.u, f.y
    w = scene.W * (0.8 if scene.ap else 1.02)
    border = w + 0.15 * (y - a.apex_y)
    top = a.apex_y - 0.05
    return _ramp(u - border, 0.03) * _ramp(y - top, 0.05) * _ramp(a.apex_y + 0.6 - y, 0.1)


# ----------------------------------------------------------------------------- body


def _body(scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """Soft-tissue thickness of trunk, neck and shoulders, and the body outline mask.

    The trunk is an elliptical cross-section whose width grows from the axillae to the lower
    chest, so its thickness falls off smoothly towards the rounded flanks and shoulders.
    """
    a, f = scene.a, scene.f
    u, y = f.u, f.y
    bw, nw = a.body_width, a.neck_width
    tl = np.clip((u - nw) / (bw - nw), 0.0, 1.0)
    shoulder = a.shoulder_y + 0.35 * tl**2
    below = np.clip((y - a.shoulder_y) / 0.9, 0.0, 1.0)
    width = bw * (0.93 + 0.09 * np.sqrt(below)) * (1.0 - 0.04 * np.clip(y - 0.6, 0.0, 0.4))
    mask = np.maximum(_ramp(y - shoulder, 0.08), _ramp(nw - u, 0.05))
    ub = np.minimum(u / width, 1.0)
    trunk = np.sqrt(1.0 - ub * ub) * (0.75 + 0.25 * _ramp(y - shoulder - 0.08, 0.25))
    neck = np.sqrt(np.maximum(1.0 - (u / nw) ** 2, 0.0)) * 0.75
    thick = np.maximum(trunk * mask, neck)
    # chest-wall muscles: a little extra tissue lateral to the lungs, fading upwards
    wall = _gauss((u - scene.lateral - 0.07) / 0.06) * _ramp(y - a.apex_y, 0.2)
    thick = thick + 0.12 * wall * mask
    return _blur(thick, 0.012 / f.px) * a.soft_tissue, mask


def _breasts(scene: _Scene) -> np.ndarray:
    """Lower-lateral breast shadows with a sharper inferior (inframammary) margin."""
    a, f = scene.a, scene.f
    if a.breast <= 0:
        return np.zeros_like(f.x)
    r = 0.32 + 0.12 * a.breast
    cx = 0.55 * a.body_width
    cy = a.costophrenic_y - 0.1
    d = np.hypot(f.u - cx, (f.y - cy) * 1.2)
    lower = np.clip((f.y - (cy - r)) / (1.8 * r), 0.0, 1.0) ** 1.5
    lateral = np.clip((f.u - 0.3) / 0.35, 0.0, 1.0)
    return a.breast * _ramp(r - d, 0.03) * lower * lateral * 0.3


# ----------------------------------------------------------------------------- findings layers


def _lung_findings(
    scene: _Scene, rng: np.random.Generator, fine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aeration left per lung pixel, extra density, and the consolidated region (for bronchi)."""
    f, plan, sev = scene.f, scene.plan, scene.plan.sev
    keep = np.ones_like(f.x)
    extra = np.zeros_like(f.x)
    consolidated = np.zeros_like(f.x)
    for name, dense in (("Lung Opacity", 0.6), ("Pneumonia", 0.88), ("Consolidation", 0.97)):
        s = sev[name]
        if s:
            region = _airspace_region(scene, rng, name, fine, s)
            keep *= 1.0 - dense * region
            if name != "Lung Opacity":
                consolidated = np.maximum(consolidated, region * (s * dense))
    if sev["Edema"]:
        keep *= 1.0 - sev["Edema"] * 0.55 * _batwing(scene)
    for side, depth in plan.effusion:
        fluid = _effusion_mask(scene, side, depth)
        keep *= 1.0 - 0.97 * fluid
        extra += 0.12 * fluid * scene.lung
    if sev["Pleural Other"]:
        keep *= 1.0 - _pleural_thickening(scene, rng)
    if sev["Atelectasis"]:
        keep *= 1.0 - 0.65 * _plate_atelectasis(scene, rng)
    if sev["Lung Lesion"]:
        mask, profile = _lesions(scene, rng)
        keep *= 1.0 - 0.9 * mask
        extra += 0.04 * profile
    return keep, extra, consolidated


def _zone_centre(scene: _Scene, side: int, zone: str, rng: np.random.Generator) -> tuple:
    """Centre (x, y) and radii of an upper, middle (paracardiac) or lower zone on one side."""
    a = scene.a
    w = a.lung_width_l if side > 0 else a.lung_width_r
    dome = scene.dome_l if side > 0 else scene.dome_r
    u = rng.uniform
    if zone == "upper":
        cu, cy, rx, ry = u(0.45, 0.6) * w, u(a.apex_y + 0.22, a.hilum_y - 0.08), 0.3, 0.22
    elif zone == "middle":
        cu, cy, rx, ry = u(0.3, 0.45) * w, u(a.hilum_y + 0.12, dome - 0.22), 0.26, 0.22
    else:
        cu, cy, rx, ry = u(0.45, 0.62) * w, dome - u(0.12, 0.22), 0.32, 0.22
    return side * cu, cy, rx * w / 0.85, ry


def _airspace_region(
    scene: _Scene, rng: np.random.Generator, name: str, fine: np.ndarray, s: float
) -> np.ndarray:
    """Patchy (opacity) to confluent lobar (consolidation) airspace disease region.

    An irregular, noise-warped blob with soft margins; lobar disease may be cut by one curved,
    oblique fissure, which then gives the only sharp edge.
    """
    f = scene.f
    opacity = name == "Lung Opacity"
    sides = _pick_sides(rng, 0.35 if opacity else 0.12)
    zones = ("upper", "middle", "lower")
    noise = _smooth_noise(rng, f.size, 10) + 0.4 * fine
    size = 0.75 + 0.25 * s
    env = np.zeros_like(f.x)
    for side in sides:
        zone = zones[int(rng.choice(3, p=(0.3, 0.25, 0.45)))]
        cx, cy, rx, ry = _zone_centre(scene, side, zone, rng)
        rx, ry = rx * size * rng.uniform(0.85, 1.15), ry * size * rng.uniform(0.85, 1.15)
        tilt = rng.uniform(-0.5, 0.5)
        c, sn = math.cos(tilt), math.sin(tilt)
        dx, dy = f.x - cx, f.y - cy
        r2 = ((c * dx + sn * dy) / rx) ** 2 + ((c * dy - sn * dx) / ry) ** 2
        blob = _gauss(np.sqrt(r2) * 0.9)
        if not opacity and zone != "lower" and rng.random() < 0.6:
            # minor-fissure-like edge: curved, oblique, below an upper-zone / above a middle one
            ex = side * f.x - side * cx
            fy = cy + (0.55 if zone == "upper" else -0.55) * ry
            line = fy + rng.uniform(0.12, 0.3) * rng.choice([-1, 1]) * ex
            line = line + rng.uniform(0.1, 0.4) * ex * ex
            cut = line - f.y if zone == "upper" else f.y - line
            blob = np.maximum(blob, _gauss(np.sqrt(r2) * 0.7)) * _ramp(cut, 1.5 * f.e)
        env = np.maximum(env, blob)
    k_noise = {"Lung Opacity": 0.5, "Pneumonia": 0.35, "Consolidation": 0.25}[name]
    thresh = {"Lung Opacity": 0.45, "Pneumonia": 0.33, "Consolidation": 0.22}[name]
    thresh += (1.0 - s) * 0.25
    field = env * (1.0 + k_noise * noise) + 0.5 * k_noise * noise
    patch = np.clip((field - thresh) / 0.3, 0.0, 1.0)
    return patch * patch * (3.0 - 2.0 * patch) * scene.lung


def _batwing(scene: _Scene) -> np.ndarray:
    """Bilateral perihilar haze of alveolar oedema."""
    f, a = scene.f, scene.a
    hu = a.mediastinum_width + 0.14
    return _gauss((f.u - hu) / 0.32, (f.y - a.hilum_y - 0.08) / 0.4) * scene.lung


def _effusion_mask(scene: _Scene, side: int, depth: float) -> np.ndarray:
    """Dependent pleural fluid with a lateral meniscus, on one side."""
    f = scene.f
    onside = _ramp(side * f.x, f.e)
    cp = scene.cp_l if side > 0 else scene.cp_r
    level = cp - depth
    rise = np.clip(f.u / scene.W, 0.0, 1.2) ** 3
    surface = level - 0.5 * depth * rise
    return onside * _ramp(f.y - surface, 0.04)


def _pneumothorax(scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """Inflated-lung mask (0 in the pleural air space) and the visceral pleural line."""
    f = scene.f
    inflated = np.ones_like(f.x)
    line = np.zeros_like(f.x)
    for side, d in scene.plan.pneumothorax:
        onside = _ramp(side * f.x, f.e)
        cm = _ramp(scene.lateral - d - f.u, 0.7 * f.e) * _ramp(f.y - scene.top - 0.8 * d, f.e)
        cm = 1.0 - onside * (1.0 - cm)
        inflated *= cm
        line += 4.0 * cm * (1.0 - cm) * scene.lung * onside
    return inflated, line


def _lesions(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mask and thickness profile of one to three round nodules or a single larger mass."""
    f, a, s = scene.f, scene.a, scene.plan.sev["Lung Lesion"]
    mask = np.zeros_like(f.x)
    profile = np.zeros_like(f.x)
    n = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
    for _ in range(n):
        side = -1 if rng.random() < 0.5 else 1
        w = a.lung_width_l if side > 0 else a.lung_width_r
        cx = side * rng.uniform(a.mediastinum_width + 0.2, w - 0.15)
        cy = rng.uniform(a.apex_y + 0.2, (a.dome_l if side > 0 else a.dome_r) - 0.2)
        r = (rng.uniform(0.07, 0.12) if n == 1 else rng.uniform(0.04, 0.065)) * (0.4 + 0.6 * s)
        dx, dy = f.x - cx, f.y - cy
        d = np.sqrt(dx * dx + dy * dy)
        rr = r * (1.0 + 0.1 * np.sin(3 * np.arctan2(dy, dx) + rng.uniform(0, 6.3)))
        m = _ramp(rr - d, 1.2 * f.e)
        mask = np.maximum(mask, m)
        profile += m * np.sqrt(np.clip(1.0 - (d / rr) ** 2, 0.1, 1.0)) * (r / 0.1)
    return mask * scene.lung, profile


def _plate_atelectasis(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Linear, plate-like basal band densities: thin, tapered, slightly oblique and curved."""
    f, a, s = scene.f, scene.a, scene.plan.sev["Atelectasis"]
    out = np.zeros_like(f.x)
    for _ in range(int(rng.integers(1, 3))):
        side = -1 if rng.random() < 0.5 else 1
        w = a.lung_width_l if side > 0 else a.lung_width_r
        dome = scene.dome_l if side > 0 else scene.dome_r
        cx = side * rng.uniform(0.5, 0.65) * w
        cy = dome - rng.uniform(0.08, 0.2)
        half = rng.uniform(0.14, 0.22) * (0.6 + 0.4 * s)
        tilt = rng.uniform(0.08, 0.3) * rng.choice([-1, 1])
        bend = rng.uniform(-1.2, 1.2)
        thick = rng.uniform(0.012, 0.02) * (0.7 + 0.3 * s)
        c, sn = math.cos(tilt), math.sin(tilt)
        dx, dy = f.x - cx, f.y - cy
        along = c * dx + sn * dy
        across = c * dy - sn * dx - bend * along * along
        taper = np.sqrt(np.clip(1.0 - (along / half) ** 2, 0.0, 1.0))
        out = np.maximum(out, _ramp(thick * taper - np.abs(across), 1.5 * f.e))
    return out * scene.lung * (1.0 - scene.heart)


def _pleural_thickening(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Lobulated pleural thickening along the lateral chest wall."""
    f, a, s = scene.f, scene.a, scene.plan.sev["Pleural Other"]
    out = np.zeros_like(f.x)
    for side in _pick_sides(rng, 0.3):
        onside = _ramp(side * f.x, f.e)
        y0 = rng.uniform(a.apex_y + 0.15, -0.1)
        y1 = y0 + rng.uniform(0.4, 0.7) * (0.6 + 0.4 * s)
        along = np.clip(np.minimum(f.y - y0, y1 - f.y) / 0.1, 0.0, 1.0)
        lobes = 1.0 + 0.3 * np.sin(f.y * rng.uniform(25, 40) + rng.uniform(0, 6.3))
        t = rng.uniform(0.04, 0.065) * (0.6 + 0.4 * s) * np.sqrt(along) * lobes
        out = np.maximum(out, onside * _ramp(f.u - (scene.lateral - t), f.e) * (along > 0))
    return out * scene.lung


def _kerley_lines(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Short horizontal septal lines at the lateral lung bases."""
    f = scene.f
    pts_x, pts_y = [], []
    for side in (-1, 1):
        w = scene.a.lung_width_l if side > 0 else scene.a.lung_width_r
        dome = scene.dome_l if side > 0 else scene.dome_r
        for _ in range(int(rng.integers(3, 6))):
            yk = dome + rng.uniform(-0.2, 0.05)
            length = rng.uniform(0.04, 0.07)
            xs = np.linspace(w + 0.02 - length, w + 0.02, 24) * side
            pts_x.append(xs)
            pts_y.append(np.full(xs.size, yk))
    canvas = f.splat(np.concatenate(pts_x), np.concatenate(pts_y), 0.02)[0]
    return _blur(canvas, 0.6) * scene.lung * 2.5


# ----------------------------------------------------------------------------- devices


def _curve(points: list[tuple[float, float]], step: float) -> tuple[np.ndarray, np.ndarray]:
    """Densely sampled Catmull-Rom spline through the control points."""
    p = np.asarray(points, dtype=np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    xs, ys = [], []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        n = max(2, int(np.hypot(*(p2 - p1)) / step) + 1)
        t = np.linspace(0.0, 1.0, n, endpoint=False)[:, None]
        c = 0.5 * (
            2 * p1
            + (-p0 + p2) * t
            + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
            + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
        )
        xs.append(c[:, 0])
        ys.append(c[:, 1])
    return np.concatenate(xs), np.concatenate(ys)


def _devices(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Opacity (0-1) of support devices: ETT, central line, NG tube, pacemaker, ECG leads."""
    f, a, s = scene.f, scene.a, scene.plan.sev["Support Devices"]
    kinds = ["ett", "cvc", "ngt", "pacer", "ecg"]
    if s >= 1.0:
        odds = (0.5, 0.55, 0.45, 0.2, 0.35)
        chosen = [k for k, p in zip(kinds, odds, strict=True) if rng.random() < p]
        if not chosen:
            chosen = [kinds[int(rng.integers(0, 4))]]
    else:
        chosen = [("ecg", "cvc")[int(rng.integers(0, 2))]]
    step = 0.4 * f.px
    thin_x: list[np.ndarray] = []
    thin_y: list[np.ndarray] = []
    thick_x: list[np.ndarray] = []
    thick_y: list[np.ndarray] = []
    carina_y = a.hilum_y - 0.12
    box = np.zeros_like(f.x)
    j = rng.uniform
    if "ett" in chosen:
        tip = carina_y - j(0.07, 0.16)
        pts = [(j(-0.02, 0.02), -1.1), (j(-0.02, 0.02), -0.7), (0.0, tip)]
        cx, cy = _curve(pts, step)
        thick_x.append(cx)
        thick_y.append(cy)
    if "cvc" in chosen:
        side = -1 if rng.random() < 0.7 else 1
        tip = (j(-0.08, -0.04), carina_y + j(0.05, 0.18))
        if rng.random() < 0.5:  # internal jugular
            pts = [(side * 0.2, -1.1), (side * 0.14, -0.75), (side * 0.08, -0.45), tip]
        else:  # subclavian
            pts = [
                (side * 0.62, a.apex_y - 0.02),
                (side * 0.35, a.apex_y + 0.04),
                (side * 0.1, a.apex_y + 0.18),
                tip,
            ]
        cx, cy = _curve(pts, step)
        thin_x.append(cx)
        thin_y.append(cy)
    if "ngt" in chosen:
        pts = [
            (j(-0.02, 0.03), -1.1),
            (0.03, -0.5),
            (0.05, 0.0),
            (0.08, scene.dome_l + 0.05),
            (j(0.2, 0.35), scene.dome_l + j(0.15, 0.25)),
            (j(0.3, 0.45), scene.dome_l + j(0.1, 0.3)),
        ]
        cx, cy = _curve(pts, step)
        thick_x.append(cx)
        thick_y.append(cy)
    if "pacer" in chosen:
        side = 1 if rng.random() < 0.8 else -1
        bx, by = side * j(0.4, 0.55), a.apex_y + j(0.02, 0.12)
        d = np.maximum(np.abs(f.x - bx) - 0.07, np.abs(f.y - by) - 0.045)
        box = _ramp(0.015 - d, f.e)
        for k in range(int(rng.integers(1, 3))):
            tip_x = j(0.0, 0.2)
            tip_y = scene.heart_cy + j(-0.08, 0.0)
            pts = [
                (bx - side * 0.05, by),
                (side * 0.15, by - 0.05 + 0.03 * k),
                (-0.04, a.hilum_y),
                (-0.06 + 0.02 * k, scene.heart_cy - 0.15),
                (tip_x, tip_y),
            ]
            cx, cy = _curve(pts, step)
            thin_x.append(cx)
            thin_y.append(cy)
    if "ecg" in chosen:
        rings = np.zeros_like(f.x)
        for _ in range(int(rng.integers(2, 5))):
            ex, ey = j(-0.85, 0.85), j(-0.8, 0.3)
            r = np.hypot(f.x - ex, f.y - ey)
            rings = np.maximum(rings, _ramp(0.012 - np.abs(r - 0.035), f.e))
            ang = j(0.4, 2.7)  # leave the electrode roughly downwards
            pts = [(ex, ey), (ex + 0.15 * math.cos(ang), ey + 0.15 * math.sin(ang))]
            for _ in range(3):
                px, py = pts[-1]
                pts.append((px + j(-0.25, 0.25), py + j(0.2, 0.45)))
            cx, cy = _curve(pts, step)
            thin_x.append(cx)
            thin_y.append(cy)
        box = np.maximum(box, rings)
    alpha = box
    for xs, ys, width in ((thin_x, thin_y, 0.007), (thick_x, thick_y, 0.011)):
        if not xs:
            continue
        sig = max(0.45, width / f.px)
        dens = (step / f.px) * math.sqrt(2 * math.pi) * sig
        canvas = _blur(f.splat(np.concatenate(xs), np.concatenate(ys), dens)[0], sig)
        alpha = np.maximum(alpha, np.clip(canvas * 1.3, 0.0, 1.0))
    return alpha


# ----------------------------------------------------------------------------- render


def _fracture_params(scene: _Scene, rng: np.random.Generator) -> tuple[int, int, float, float]:
    """Side, rib index, break position and step-off of a rib fracture."""
    side = -1 if rng.random() < 0.5 else 1
    w = scene.a.lung_width_l if side > 0 else scene.a.lung_width_r
    step = scene.plan.sev["Fracture"] * rng.uniform(0.05, 0.065) * rng.choice([-1, 1])
    return side, int(rng.integers(3, 8)), rng.uniform(0.5, 0.7) * w, step


def render(
    anatomy: Anatomy,
    findings: Mapping[str, float | None],
    view: str,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """uint8 (size, size) frontal chest radiograph of the anatomy showing the given findings."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if not 16 <= size <= 2048:
        raise ValueError(f"size must be in [16, 2048], got {size}")
    sev = _severities(findings)
    seeds = rng.integers(0, 2**63 - 1, size=4)
    r_tex, r_find, r_dev, r_noise = (np.random.default_rng(int(s)) for s in seeds)
    plan = _plan_findings(sev, r_find)
    f = _Frame(anatomy, size)
    scene = _Scene(anatomy, view, f, plan)
    a = anatomy

    fine = _smooth_noise(r_tex, size, 24)
    coarse = _smooth_noise(r_tex, size, 8)
    micro = _smooth_noise(r_tex, size, min(48, size // 3))
    body, body_mask = _body(scene)
    dens = 1.05 * body + _breasts(scene)

    # lung aeration: deeper (darker) centrally, thinner towards the chest wall
    depth = 0.7 + 0.3 * np.clip((scene.lateral - f.u) / 0.15, 0.0, 1.0)
    depth *= 1.0 + 0.04 * coarse - 0.18 * np.clip((f.y - a.hilum_y) / 0.7, 0.0, 1.0)
    inflated, ptx_line = _pneumothorax(scene)
    keep, extra, consolidated = _lung_findings(scene, r_find, fine)
    air = scene.lung * depth * (1.0 - 0.82 * scene.heart) * keep
    dens -= 0.7 * air

    # mediastinum, heart, great vessels and airways
    dens += 0.06 * scene.heart * _ramp(scene.heart_cy + 0.06 - f.y, 0.08)
    trachea_x = 0.02 * np.clip((f.y - a.apex_y) / 0.4, 0, 1)
    carina = a.hilum_y - 0.12
    trachea = _ramp(0.036 - np.abs(f.x - trachea_x), 2 * f.e) * _ramp(carina - f.y, 2 * f.e)
    trachea *= _ramp(f.y + 0.95, 0.1)
    dens -= 0.07 * trachea
    for side, ang, ln in ((-1, 0.55, 0.13), (1, 0.85, 0.16)):
        p1 = (side * ln * math.sin(ang), carina + ln * math.cos(ang))
        dens -= 0.06 * _ramp(0.024 - _segment_distance(f.x, f.y, (0.0, carina), p1), 2 * f.e)
    hx = a.mediastinum_width + 0.06
    hila = _gauss((f.u - hx) / 0.07, (f.y - a.hilum_y - 0.02) / 0.12)
    hila += 0.6 * _gauss((f.u - hx - 0.03) / 0.05, (f.y - a.hilum_y - 0.14) / 0.07)
    dens += 0.16 * hila * scene.lung

    # lung markings, hidden by collapse/effusion/consolidation
    trunks, branches = _vessels(scene)
    vessels = (trunks + branches) * inflated * (1.0 - consolidated)
    dens -= 0.6 * trunks * consolidated  # air bronchograms
    if sev["Edema"]:
        halo = _blur(vessels, max(1.0, 0.02 / f.px))
        mix = sev["Edema"] * 0.7
        vessels = (1.0 - mix) * vessels + mix * 1.6 * halo
        if r_find.random() < 0.7:
            dens += sev["Edema"] * 0.25 * _kerley_lines(scene, r_find)
    dens += vessels * (scene.lung * 0.85 + 0.15) * (1.0 - 0.65 * scene.heart)
    texture = 0.025 * fine + 0.02 * coarse + 0.045 * micro * (0.6 + 0.4 * np.abs(fine))
    dens += texture * scene.lung * inflated

    # findings that add density
    dens += 0.15 * ptx_line + extra

    # bones
    bone = 0.15 * a.bone_density
    fracture = _fracture_params(scene, r_find) if sev["Fracture"] else None
    ribs, cage = _ribs(scene, fracture)
    behind_heart = 1.0 - 0.8 * scene.heart
    dens += bone * (1.1 * ribs * (0.2 + 0.8 * scene.lung) * behind_heart + 0.5 * cage)
    dens += bone * 1.2 * _clavicles(scene)
    # the spine shows moderately above the heart and only faintly through it
    spine_vis = 0.55 - 0.37 * _ramp(f.y - scene.heart_top - 0.05, 0.15)
    dens += bone * _spine(scene) * spine_vis * (0.4 + 0.6 * body_mask)
    dens += 0.1 * _scapulae(scene) * body_mask

    # abdomen: stomach gas bubble under the left hemidiaphragm
    if a.stomach_gas > 0.3:
        gas = _ellipse(f.x, f.y, 0.32, scene.dome_l + 0.1, 0.12, 0.06, 3 * f.e)
        dens -= 0.22 * a.stomach_gas * gas * _ramp(f.y - scene.dome_l - 0.04, 2 * f.e)

    return _expose(dens, scene, r_noise, _devices(scene, r_dev) if sev["Support Devices"] else None)


def _expose(
    dens: np.ndarray, scene: _Scene, rng: np.random.Generator, devices: np.ndarray | None
) -> np.ndarray:
    """Detector response, processing, noise and quantisation of a density map."""
    a, f = scene.a, scene.f
    noise = rng.standard_normal(dens.shape, dtype=_F32)
    dens = dens + (0.012 * a.noise) * noise
    dens = _blur(dens, 0.6)
    low = _blur(dens, 0.1 / f.px)
    # CXR post-processing: compress large-scale dynamic range, boost detail
    dens = 0.5 * low + 0.5 * float(low.mean()) + 1.35 * (dens - low)
    k = 1.0 * a.contrast
    v = 1.0 - np.exp(-k * np.maximum(dens + a.exposure, 0.0))
    img = np.minimum(_AIR_LEVEL + 290.0 * v, _ANATOMY_MAX)
    if devices is not None:
        level = _DEVICE_LEVEL + 2.0 * noise
        img = img * (1.0 - devices) + level * devices
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- measurement


def cardiothoracic_ratio(image: np.ndarray) -> float:
    """Heart width / internal thoracic width, measured from the pixels of a phantom radiograph.

    The lung fields are the dark runs on either side of the bright mediastinum. On each side the
    hemidiaphragm is found by walking down the middle of the lung field; the heart border is the
    inner edge of the lung run in the rows just above it, and the thoracic width is the widest
    span between the runs' outer edges. Returns NaN when no lung fields are found.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or img.shape[0] != img.shape[1] or img.shape[0] < 32:
        raise ValueError("expected a square 2-D grayscale image of at least 32x32 pixels")
    n = img.shape[0]
    g = _blur(img, max(1.0, n / 80.0))
    mid = n // 2
    body = g[int(0.3 * n) : int(0.8 * n), int(0.1 * n) : int(0.9 * n)]
    lung_level = float(np.percentile(body, 10))
    centre = g[int(0.55 * n) : int(0.8 * n), mid - n // 32 : mid + n // 32 + 1]
    dark = g < lung_level + 0.5 * (float(np.median(centre)) - lung_level)
    rows = np.arange(n)
    inner, outer = [], []
    for half in (dark[:, mid:], dark[:, : mid + 1][:, ::-1]):
        has = half.any(axis=1)
        start = np.where(has, np.argmax(half, axis=1), n)
        inner.append(start)
        outer.append(np.where(has, _run_end(half, start), 0))
    both = (inner[0] < n // 2) & (inner[1] < n // 2) & (rows > 0.25 * n)
    heart = 0.0
    lowest = 0
    for k, half in enumerate((dark[:, mid:], dark[:, : mid + 1][:, ::-1])):
        dome = _diaphragm_row(half, inner[k], outer[k], n)
        band = rows[(rows >= 0.45 * n) & (rows < dome) & both]
        if band.size == 0:
            return float("nan")
        heart += float(np.sort(inner[k][band])[-min(2, band.size)])
        lowest = max(lowest, dome)
    # thoracic width: widest lung span, down to the costophrenic angles just below the domes
    closed = (outer[0] < n // 2 - 1) & (outer[1] < n // 2 - 1)
    lung_rows = both & closed & (rows < lowest + n // 8)
    lung_rows &= (outer[0] - inner[0] > n // 32) & (outer[1] - inner[1] > n // 32)
    thorax = np.where(lung_rows, outer[0] + outer[1], 0)
    if thorax.max() <= 0:
        return float("nan")
    return heart / float(thorax.max())


def _diaphragm_row(half: np.ndarray, inner: np.ndarray, outer: np.ndarray, n: int) -> int:
    """Top row of the hemidiaphragm: highest solid non-lung stretch across the lung's middle."""
    r0 = int(0.55 * n)
    if inner[r0] >= outer[r0]:
        return n
    stretch = max(3, n // 25)
    best = n
    for frac in (0.35, 0.5, 0.65):
        col = min(int(inner[r0] + frac * (outer[r0] - inner[r0])), half.shape[1] - 1)
        solid = np.convolve(~half[r0:, col], np.ones(stretch), mode="valid") >= stretch
        if solid.any():
            best = min(best, r0 + int(np.argmax(solid)))
    return best


def _run_end(dark: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Per row, the index where the dark run beginning at start ends (1-pixel gaps bridged)."""
    n = dark.shape[1]
    cols = np.arange(n)
    bright = ~dark & (cols[None, :] >= start[:, None])
    nxt = np.ones_like(bright)
    nxt[:, :-1] = bright[:, 1:]
    bright &= nxt
    return np.where(bright.any(axis=1), np.argmax(bright, axis=1), n)
