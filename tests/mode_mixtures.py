"""Partially coherent probe mixtures written independently of ``hxn_ptycho.simulate``.

The project's simulator makes its extra modes from the first mode's derivatives — the very shapes
``probe_modes=auto`` starts its new modes from — so a rule tuned on it can pass without meeting a
mode shape it did not expect. These families make the modes by other physics; each gives K
orthonormal mode shapes, to which a chosen power spectrum is given, so the true count is exact:

- ``shifted``: a lens focus shifted in 2-D by up to ~3 px (a vibrating or drifting beam);
  the orthonormal basis of the shifted copies (their eigenmodes).
- ``defocus``: the same pupil seen at K defocus distances (a chromatic spread along the axis).
- ``random``: random band-limited pupil fields on the lens aperture (no physical model at all).
- ``gsm``: the coherent modes of a Gaussian Schell-model source, partially coherent along x
  (Hermite–Gaussian pupil weightings, Starikov & Wolf 1982), imaged by a lens; the powers are
  then the GSM's geometric spectrum λ_m ∝ q^m truncated to K modes.
- ``fly``: issue 18's fly-scan-like mixture — a zone-plate probe moved continuously along the
  raster's fast axis during the exposure; its three strongest eigenmodes, 68/24/8 % by default.
- ``zernike`` (held out: looked at once, after the rule was fixed): pupil aberration modes,
  Zernike polynomials (tilt, astigmatism, coma) on an annular zone-plate pupil.
- ``kbslit`` (session 22's held-out family, written before its rule's grid was run and run once at the
  end): a Kirkpatrick–Baez mirror pair (a rectangular pupil, smooth random figure errors of each mirror)
  lit by a uniform incoherent source behind slits of different widths in x and y. By van Cittert–Zernike
  the mutual intensity across the pupil is sinc-shaped along each axis (not Gaussian: not the GSM's
  Hermite–Gaussian modes); the coherent modes are products u_m(k_x)·v_n(k_y) of the 1-D eigenvectors
  of those sinc kernels on the mirrors' apertures (prolate-spheroidal-like), ordered by the products of
  their eigenvalues.
- ``mll`` (session 23's held-out family, written by a helper who ran no reconstruction on it): HXN's
  crossed multilayer Laue lenses — two 1-D lenses, one per axis, on their own stages (hxn-profile-collection
  startup/13-mll.py: ``hmll``/``vmll`` each with its own z, an order-sorting aperture ``mllosa`` and a
  beamstop ``mllbs``), so the pupil is a product of two 1-D apertures of different widths, each with
  its own defocus (the two foci differ: astigmatism), a diffraction efficiency falling from the inner
  to the outer (thinnest) layers of the off-axis half and a smooth random zone-placement (figure)
  error; the detector ROI centred on the bright field. The source is the undulator's image in the
  secondary source aperture, whose gaps are set per axis (startup/12-endstation.py: ``ssa2`` ``hgap``
  and ``vgap``): horizontally a wide Gaussian cut by the slit to a near flat top, vertically a narrow
  Gaussian; plus a sinusoidal vibration of the optics along an oblique direction (its positions
  arcsine-distributed). The mutual intensity is a weighted sum over those source points (not a
  Gaussian Schell kernel, not a slit's sinc; the oblique vibration couples x and y, so the modes are
  not exact products of 1-D modes: the 2nd and 3rd are ~4 % off one); the coherent modes are its
  eigenmodes (the SVD over the source points; their own shares are ~69/19/8/3 %).
  ptycho_gui (core/ptycho_param.py) records energy, z_m and ccd_pixel_um and models partial coherence by
  one Gaussian kernel (``pc_sigma``); this family is meant to be unlike that too.
- ``fzp`` (session 24's held-out family, written by a helper who ran no reconstruction on it): a Fresnel
  zone plate lit through HXN's Si(111) double-crystal monochromator and its secondary source aperture.
  Hardware as hxn-profile-collection describes it: startup/15-zp.py (the zone plate ``zp`` on its own z
  stages, its beam stop ``zpbs`` (the central stop) and order-sorting aperture ``zposa``: together they pass
  the first order only, an annular pupil), startup/10-optics.py (the DCM, ``dcm``; its energy pseudo-motor
  ``monoe`` uses Si(111)'s d = 3.1355893 Å), startup/71-energy.py (the energy change: undulator harmonic
  3–9, mirror stripe, mono angle; it sets the SSA2 gaps per axis) and startup/12-endstation.py (``ssa2``
  ``hgap``/``vgap``). Physics: a ZP's focal length is ∝ E, so a slice at E(1 + ε) reaches the sample
  defocused by a pupil phase π·N·ε·ρ² (N = D/4Δr zones, ρ = r/R); the slices' weights are the two-crystal
  Si(111) reflectivity, the Darwin curve squared (total reflection over ΔE/E ≈ 1.33e-4, steep
  (|y| − √(y²−1))⁴ wings: a flat top, not a Gaussian). N = 7000 (an assumed large, high-resolution ZP, e.g.
  ⌀ 420 µm with 15 nm outer zones; not read from the profile collection) puts it near the monochromaticity
  limit N ≈ E/ΔE, so the chromatic spread is a mode of its own. The pupil: central stop 42 % of the radius,
  an efficiency falling 30 % towards the thinnest outer zones, a smooth random radial zone-placement (ring)
  error; the sample 0.35 (``_lens``'s units) out of focus. The source behind a nearly closed SSA2 (as for
  coherent imaging): a slit-limited uniform line along x, a narrow undulator Gaussian along y; each source
  point tilts the pupil. On the pupil the mutual intensity is the product of a radial kernel in (ρ₁², ρ₂²)
  (the chromatic one, in no other family) and a translation kernel in k₁ − k₂ (the source's); the coherent
  modes are its eigenmodes (J over the energy × source points, on the aperture): at 64² the fundamental, a
  rotationally symmetric "breathing" chromatic mode (∝ (ρ² − ⟨ρ²⟩)·P₀ on the pupil: the focus's Laplacian), the
  x-lateral mode, then the y one (own shares ~91/5/3/1 %).
- ``osa`` (session 25's held-out family, written by a helper who ran no reconstruction on it): a zone plate
  whose order-sorting aperture vibrates across the converging first-order cone during each exposure, clipping
  the pupil's rim by a changing crescent while the focus stays put. Hardware as hxn-profile-collection
  describes it: startup/15-zp.py (the OSA ``zposa`` rides on its own open-loop attocube ANC350 stack
  (``zposax/y/z``), apart from the zone plate's MCS stages ``zp`` and the fine sample stage ``zpssx/y/z``
  "closed on cap sensors/interferometer"), startup/23-interferometers.py (the interferometer channels watch the
  sample stage and the ZP (``int_zpssx``…, ``int_zpx1``…, ``int_zpz``), none the OSA) and startup/93-scanplan-panda.py
  (``fly2dpd``: the PPMAC moves zpssx/zpssy on the fly while the PandA's pulse2 gates each frame for
  exposure_time − dead_time, the Zebra copying the triggers to the detectors; a Merlin needs ≥ 5 ms dead time, so
  a frame lasts ms or more: many periods of a ~kHz mount resonance). So the lens–sample distance and the focus are held, but the OSA is
  not: it sits a distance d before the focus where the cone nearly fills its hole (to block the zero order in the
  central stop's shadow), and a displacement δ of the OSA moves its shadow on the pupil by δ·f/d (≈ 20×), so a
  ~1 µm resonance sweeps the shadow's edge over a quarter of the lens radius. Model: the annular pupil of
  ``fzp`` (central stop 42 %, efficiency falling 30 % outwards, a smooth random ring error, the sample 0.35 out
  of focus) times the OSA's shadow, a disk of the lens's radius with an edge blurred over 0.08 R (its Fresnel
  width √(λd)·f/d), centred at a static misalignment (0.08 R, random direction) plus an elliptical orbit (one
  resonance, 0.24 R and 0.16 R along a random axis, a random 30–60° phase lag between them) sampled at 48
  equal times. No source extent, no focus motion, no energy spread: unlike every other family the coherent
  fields differ only by a hard-ish amplitude obstruction of the pupil's rim. The modes are the eigenmodes of
  the mutual intensity over the orbit (the SVD over its times, on the aperture): the mean clipped lens, then
  rim modes (≳ 90 % of their pupil power at ρ > 0.8, against ~27 % for the first): the crescent's changes
  along the orbit (own shares ~93.5/4.8/0.8–1.3/0.4 %).
- ``crl`` (session 30's held-out family, written by a helper who ran no reconstruction or count on it): the
  undulator's image prefocused by HXN's compound refractive lens onto the secondary source aperture, whose jaws
  cut that partially coherent spot, and the zone plate lit by its far field. Hardware as hxn-profile-collection
  describes it: startup/11-machine.py (the source, the in-vacuum undulator ``IVU20``; the front-end slits),
  startup/10-optics.py (``crl``, a lens on x/y/pitch stages in the optics hutch XF:03IDA, beside the DCM and
  mirrors), startup/12-endstation.py (``ssa1`` in XF:03IDB with ``hgap``/``vgap``: taken here as the CRL's image
  plane, an assumption, as are all distances) and startup/15-zp.py (the zone plate). Physics: each undulator point
  c is imaged by the CRL onto SSA1 as a coherent spot, a Gaussian (the CRL's parabolic profile makes its absorption
  aperture Gaussian) on a wavefront diverging from the CRL; the jaws pass |s| ≤ h of it; the lens, far downstream,
  sees the Fraunhofer field of what passed. From the geometry: a source point tilts the lens's illumination (a
  phase ramp: the focus moves) and its footprint walks only by c·(1 + L2/d2), ≈ 0.7 % of the footprint's width per
  spot width of c at 10 keV, a CRL aperture of ~0.2 mm rms and ~30 m (kept, through the curvature phase): the
  footprint stays round, Gaussian and centred on the lens, lighting the outer zones at ~0.8 of the inner ones
  (the jaws' cut widens it from the uncut 0.4 at the rim). So, unlike the other families, each coherent mode is a
  slit-cut coherent spot (not an incoherent point: ``mll``, ``fzp``; not an incoherent slit: ``kbslit``; not an
  untruncated Gaussian Schell source: ``gsm``), and the lens is not uniformly lit. In probe-plane pixels:
  the spot's amplitude exp(−(s − c)²/4w²), w = 0.646; undulator image σ_x = 1.5 (horizontal, large), σ_y = 0.3;
  SSA1 half-gaps h = 1.0 on both axes (closed to about the diffraction-limited spot, as for coherent imaging). On
  ``fzp``'s zone-plate pupil (central stop 42 %, efficiency falling 30 % outwards, a random ring error, 0.35 out of
  focus). Not scaled with n (the lens's radius is n/6: its focus has the same width in pixels at any n). The
  modes are the eigenmodes of the mutual intensity over the undulator points (the SVD on the
  aperture): the round, apodized fundamental, then the x-lateral mode, then the y one (own shares
  ~98.2/1.55/0.29/0.003 %: SSA1 closed this far makes the beam nearly coherent; the caller sets the shares).

The object is also independent: an amplitude of random disks and a phase of filtered noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hxn_ptycho.scanfile import ScanData

FAMILIES = ("shifted", "defocus", "random", "gsm", "fly")
HELD_OUT = "zernike"
HELD_OUT_S22 = "kbslit"      # session 22's held-out family (docs/auto_modes.md, "Session 22")
HELD_OUT_S23 = "mll"         # session 23's held-out family (crossed MLLs, SSA source, vibration)
HELD_OUT_S24 = "fzp"         # session 24's held-out family (polychromatic zone plate, DCM band, SSA source)
HELD_OUT_S25 = "osa"         # session 25's held-out family (zone plate, its OSA vibrating across the cone's rim)
HELD_OUT_S30 = "crl"         # session 30's held-out family (CRL-prefocused undulator image cut by SSA1, zone plate)
ENERGY_KEV, DISTANCE_M, CCD_PIXEL_UM = 10.0, 0.6, 75.0


def _pupil_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    k = np.fft.fftfreq(n) * n
    return np.meshgrid(k, k, indexing="ij")


def _to_sample(pupil: np.ndarray) -> np.ndarray:
    """Far-field pupil (zero frequency at [0, 0]) to the probe on the sample (centred)."""
    return np.fft.fftshift(np.fft.ifft2(pupil))


def _lens(n: int, radius: float, stop: float, defocus: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pupil of a lens (annular if ``stop`` > 0) with a defocus phase; and the grid (ky, kx)."""
    ky, kx = _pupil_grid(n)
    kr = np.hypot(ky, kx)
    pupil = ((kr <= radius) & (kr >= stop * radius)).astype(np.complex128)
    pupil *= np.exp(1j * np.pi * defocus * (kr / radius) ** 2 * 6)
    return pupil, ky, kx


def _shift(img: np.ndarray, dr: float, dc: float) -> np.ndarray:
    kr = np.fft.fftfreq(img.shape[0])[:, None]
    kc = np.fft.fftfreq(img.shape[1])[None, :]
    return np.fft.ifft2(np.fft.fft2(img) * np.exp(-2j * np.pi * (kr * dr + kc * dc)))


def _mll_axis(n: int, half: float, defocus: float, rng: np.random.Generator) -> np.ndarray:
    """1-D pupil of one MLL (an off-axis half; the detector ROI centred on its bright field) on the
    frequency grid: aperture |k| ≤ ``half``; an efficiency falling by 25–35 % from the inner edge (t = −1,
    nearest the optical axis) to the outer, thinnest layers (t = +1); a smooth random zone-placement error
    (≲ 1 rad); the axis's own defocus (``_lens``'s convention, 6π·defocus·t²)."""
    k = np.fft.fftfreq(n) * n
    t = k / half
    eff = 1 - (0.25 + 0.1 * rng.uniform()) * (t + 1) / 2
    c = rng.standard_normal(4)
    figure = 0.5 * (c[0] * t ** 3 + 0.6 * c[1] * t ** 4) + 0.3 * c[2] * np.sin(np.pi * (2.5 * t + c[3]))
    field = np.sqrt(np.clip(eff, 0, None)) * np.exp(1j * (figure + 6 * np.pi * defocus * t ** 2))
    return np.where(np.abs(t) <= 1, field, 0)


def _eigenmodes(fields: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal eigenmodes of the mixture Σ w_j |f_j⟩⟨f_j| and their power shares, strongest first."""
    m = fields.reshape(fields.shape[0], -1)
    w = np.ones(len(m)) if weights is None else np.asarray(weights, float)
    a = m * np.sqrt(w / w.sum())[:, None]
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    modes = vh.reshape((-1,) + fields.shape[1:])
    modes /= np.sqrt(np.sum(np.abs(modes) ** 2, axis=(1, 2)))[:, None, None]
    return modes, s ** 2 / np.sum(s ** 2)


def _gram_schmidt(fields: np.ndarray) -> np.ndarray:
    out: list[np.ndarray] = []
    for f in fields.astype(np.complex128):
        for b in out:
            f = f - np.vdot(b, f) * b
        out.append(f / np.sqrt(np.vdot(f, f).real))
    return np.asarray(out)


def _zone_plate_pupil(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A zone plate's first-order pupil (``fzp``, ``osa``): annular (central stop 42 % of the radius n/6),
    an efficiency falling 30 % towards the outer zones, a smooth random radial zone-placement error, the
    sample 0.35 out of focus. Returns the pupil grid (ky, kx), the aperture's mask, ρ on it and the pupil
    on it (three normal draws from ``rng``)."""
    ky, kx = _pupil_grid(n)
    rho = np.hypot(ky, kx) / (n / 6)
    inside = (rho <= 1) & (rho >= 0.42)
    r = rho[inside]
    c = rng.standard_normal(3)
    ring = 0.35 * c[0] * (6 * r ** 4 - 6 * r ** 2 + 1) + 0.25 * c[1] * np.sin(np.pi * (3 * r + c[2]))
    eff = 1 - 0.3 * (r - 0.42) / 0.58
    return ky, kx, inside, r, np.sqrt(eff) * np.exp(1j * (ring + 6 * np.pi * 0.35 * r ** 2))


def _aperture_modes(vecs: np.ndarray, inside: np.ndarray, n: int) -> np.ndarray:
    """Modes given on the aperture's pixels (K, pixels inside) as unit-norm probes at the sample (K, n, n)."""
    fields = np.zeros((len(vecs), n, n), np.complex128)
    fields[:, inside] = vecs
    modes = np.stack([_to_sample(f) for f in fields])
    return modes / np.sqrt(np.sum(np.abs(modes) ** 2, axis=(1, 2)))[:, None, None]


def mode_shapes(family: str, K: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """K orthonormal mode shapes of ``family`` (strongest first) and, where the family has one, its
    own power spectrum (else None: the caller chooses the powers)."""
    if family == "shifted":
        pupil, _, _ = _lens(n, n / 7, 0.0, 0.8)
        p = _to_sample(pupil)
        ang = rng.uniform(0, 2 * np.pi, 24)
        rad = 3.0 * np.sqrt(rng.uniform(0, 1, 24))
        copies = np.stack([_shift(p, r * np.sin(a), r * np.cos(a)) for r, a in zip(rad, ang)])
        return _eigenmodes(copies)[0][:K], None
    if family == "defocus":
        fields = np.stack([_to_sample(_lens(n, n / 6, 0.3, d)[0]) for d in np.linspace(0.3, 1.5, max(K, 2))])
        return _gram_schmidt(fields)[:K], None
    if family == "random":
        pupil, ky, kx = _lens(n, n / 6, 0.0, 0.6)
        out = [_to_sample(pupil)]
        for _ in range(K - 1):
            noise = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
            smooth = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-(np.hypot(*_pupil_grid(n)) / 3.0) ** 2))
            out.append(_to_sample(pupil * smooth))
        return _gram_schmidt(np.stack(out)), None
    if family == "gsm":
        # GSM source partially coherent along x: coherent modes HG_m(x) (Starikov & Wolf 1982), each
        # filling the lens pupil with that weighting; powers geometric in m (set by the caller's q).
        pupil, ky, kx = _lens(n, n / 6, 0.0, 0.7)
        s = n / 12
        fields = []
        for m in range(K):
            herm = np.polynomial.hermite.hermval(kx / s, [0] * m + [1])
            fields.append(_to_sample(pupil * herm * np.exp(-(kx / s) ** 2 / 2 - (ky / (2 * s)) ** 2 / 2)))
        return _gram_schmidt(np.stack(fields)), None
    if family == "fly":
        # zone plate (annular pupil, central stop) moved along the fast axis (columns) during the exposure
        pupil, _, _ = _lens(n, n / 6, 0.45, 0.5)
        p = _to_sample(pupil)
        copies = np.stack([_shift(p, 0.0, s) for s in np.linspace(-2.5, 2.5, 41)])
        modes, _ = _eigenmodes(copies)
        return modes[:K], None
    if family == HELD_OUT:
        pupil, ky, kx = _lens(n, n / 6, 0.35, 0.6)
        rho, th = np.hypot(ky, kx) / (n / 6), np.arctan2(ky, kx)
        zern = [np.ones_like(rho), rho * np.cos(th), rho ** 2 * np.cos(2 * th), (3 * rho ** 3 - 2 * rho) * np.sin(th),
                rho * np.sin(th)]
        fields = np.stack([_to_sample(pupil * z * np.exp(1j * 0.7 * rho ** 2 * np.cos(2 * th))) for z in zern[:K]])
        return _gram_schmidt(fields), None
    if family == HELD_OUT_S22:
        # KB pair: apertures |k_x| ≤ n/6, |k_y| ≤ n/8; source slits give pupil coherence widths c_x, c_y
        # (mutual intensity sinc((k1 − k2)/c) along each axis); each mirror adds a smooth random figure error
        k = np.fft.fftfreq(n) * n
        axes = []
        for half, coh in ((n / 6, n / 6 * 0.7), (n / 8, n / 8 * 1.2)):
            inside = np.abs(k) <= half
            kk = k[inside]
            vals, vecs = np.linalg.eigh(np.sinc((kk[:, None] - kk[None, :]) / coh))
            order = np.argsort(vals)[::-1]
            full = np.zeros((n, len(kk)), np.complex128)
            full[inside] = vecs[:, order]
            c = rng.standard_normal(4)
            t = k / half
            figure = 0.8 * (c[0] * t ** 2 + 0.5 * c[1] * t ** 3 + 0.3 * c[2] * np.cos(np.pi * t) + 0.3 * c[3] * t ** 4)
            axes.append((vals[order], full * np.exp(1j * figure)[:, None]))
        (ax, ux), (ay, uy) = axes
        pairs = sorted(((ax[i] * ay[j], i, j) for i in range(4) for j in range(4)), reverse=True)[:K]
        fields = np.stack([_to_sample(uy[:, j][:, None] * ux[:, i][None, :]) for _, i, j in pairs])
        fields /= np.sqrt(np.sum(np.abs(fields) ** 2, axis=(1, 2)))[:, None, None]
        return fields, None
    if family == HELD_OUT_S23:
        # crossed MLLs: horizontal half-aperture n/7, vertical n/9; the sample 35 % further (in NA²-scaled
        # units) from the vertical lens's focus than from the horizontal's (focal mismatch)
        hx, hy, dx = n / 7, n / 9, 0.4
        px = _mll_axis(n, hx, dx, rng)
        py = _mll_axis(n, hy, dx * (hy / hx) ** 2 * 1.35, rng)
        pupil = py[:, None] * px[None, :]
        # source points in probe-plane pixels at n = 64 (scaled with n): SSA-cut Gaussians per axis
        # (σ 2.0 cut at ±1.6 along x: near flat; σ 0.6 cut at ±1.5 along y) plus a sinusoidal vibration
        # of amplitude 1.0 along a random oblique angle, sampled at 12 equally spaced times (arcsine)
        theta = rng.uniform(np.pi / 9, 4 * np.pi / 9)
        gx, gy = np.linspace(-1.6, 1.6, 11), np.linspace(-1.5, 1.5, 7)
        vib = 1.0 * np.sin(2 * np.pi * (np.arange(12) + 0.5) / 12)
        sx = (gx[:, None, None] + np.cos(theta) * vib[None, None, :]) * n / 64
        sy = (gy[None, :, None] + np.sin(theta) * vib[None, None, :]) * n / 64
        sx, sy = np.broadcast_arrays(sx, sy)
        w = np.broadcast_to(np.exp(-gx ** 2 / 8)[:, None, None] * np.exp(-gy ** 2 / 0.72)[None, :, None], sx.shape)
        ky, kx = _pupil_grid(n)
        inside = np.abs(pupil) > 0
        # each source point: the pupil with that point's tilt; eigenmodes of Σ w |f⟩⟨f| on the aperture
        tilt = np.exp(-2j * np.pi * (sy.reshape(-1, 1) * ky[inside] + sx.reshape(-1, 1) * kx[inside]) / n)
        a = pupil[inside] * tilt * np.sqrt(w.reshape(-1, 1) / w.sum())
        vh = np.linalg.svd(a, full_matrices=False)[2]
        return _aperture_modes(vh[:K], inside, n), None
    if family == HELD_OUT_S24:
        # Fresnel zone plate, annular first-order pupil (central stop + OSA), radius n/6, sample 0.35 out of focus
        ky, kx, inside, r, pupil = _zone_plate_pupil(n, rng)
        # energy slices ε = y·ΔE/E/2 over |y| ≤ 3; weight: Si(111) Darwin curve, squared for two crystals;
        # chromatic defocus π·N·ε·ρ² with N = 7000 zones
        y = np.linspace(-3, 3, 25)
        darwin = np.where(np.abs(y) <= 1, 1.0, (np.abs(y) - np.sqrt(np.clip(y ** 2 - 1, 0, None))) ** 2)
        w_e = darwin ** 2
        chrom = np.exp(1j * np.pi * 7000 * (y * 1.33e-4 / 2)[:, None] * r[None, :] ** 2)
        # source points in probe-plane pixels at n = 64 (scaled with n): uniform over ±0.45 along x (SSA2's
        # hgap), Gaussian σ 0.2 along y (sampled to ±3σ)
        gx = np.linspace(-0.45, 0.45, 5) * n / 64
        ty = np.linspace(-3, 3, 7)
        gy, w_y = 0.2 * ty * n / 64, np.exp(-ty ** 2 / 2)
        tilt = np.exp(-2j * np.pi * (gy[:, None, None] * ky[inside] + gx[None, :, None] * kx[inside]) / n)
        a = pupil * chrom[:, None, None, :] * tilt[None]
        w = w_e[:, None, None] * w_y[None, :, None] * np.ones(len(gx))[None, None, :]
        a = a.reshape(-1, len(r)) * np.sqrt(w.reshape(-1, 1) / w.sum())
        # the mutual intensity on the aperture, J(k1, k2) = Σ w f(k1) f*(k2); its eigenvectors, strongest first
        vecs = np.linalg.eigh(a.T @ a.conj())[1][:, ::-1]
        return _aperture_modes(vecs[:, :K].T, inside, n), None
    if family == HELD_OUT_S25:
        # the zone plate's pupil as in ``fzp``: annular (central stop 42 %), radius n/6, sample 0.35 out of focus
        ky, kx, inside, r, pupil = _zone_plate_pupil(n, rng)
        R = n / 6
        # the OSA's shadow on the pupil (units of R): a disk of radius 1, edge blurred over 0.08, centred at a
        # static offset 0.08 plus an elliptical orbit (0.24, 0.16 along a random axis, phase lag 30–60°)
        # sampled at 48 equal times of one period
        axis, off_dir, lag = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(np.pi / 6, np.pi / 3)
        t = 2 * np.pi * (np.arange(48) + 0.5) / 48
        u, v = 0.24 * np.cos(t), 0.16 * np.cos(t + lag)
        cx = 0.08 * np.cos(off_dir) + u * np.cos(axis) - v * np.sin(axis)
        cy = 0.08 * np.sin(off_dir) + u * np.sin(axis) + v * np.cos(axis)
        dist = np.hypot(ky[inside][None] / R - cy[:, None], kx[inside][None] / R - cx[:, None])
        shadow = 0.5 * (1 - np.tanh((dist - 1.0) / 0.08))
        # the fields at each time (equal weights); the mutual intensity's eigenmodes on the aperture (SVD)
        vh = np.linalg.svd(pupil[None] * shadow / np.sqrt(len(t)), full_matrices=False)[2]
        return _aperture_modes(vh[:K], inside, n), None
    if family == HELD_OUT_S30:
        # the zone plate's pupil as in ``fzp``: annular (central stop 42 %), radius n/6, sample 0.35 out of focus
        ky, kx, inside, r, pupil = _zone_plate_pupil(n, rng)
        # per axis, in probe-plane pixels (not scaled with n: the lens's radius is n/6, so its focus is the same
        # size in pixels at any n, and so is the footprint relative to the lens): the CRL images each undulator point c onto
        # SSA1 as a Gaussian spot (amplitude exp(-(s - c)²/4w²), w = 0.646: the CRL's absorption aperture) on a
        # wavefront diverging from the CRL (phase π·β·s², β = 0.0074/(4π w²): the geometric walk of the cone,
        # c·(1 + L2/d2), ≈ 0.7 % of the footprint per w of c); SSA1's jaws pass |s| ≤ h; the lens sees its
        # far field. Undulator image σ_x = 1.5, σ_y = 0.3 (Gaussian weights, sampled to ±3σ); h_x = h_y = 1.0.
        w_spot = 0.646
        beta = 0.0074 / (4 * np.pi * w_spot ** 2)
        s = np.linspace(-1.0, 1.0, 81)
        ds = s[1] - s[0]

        def lens_field(c: np.ndarray, k: np.ndarray) -> np.ndarray:
            # (len(c), len(k)): Σ_s t(s) g(s - c) e^{iπβs²} e^{-2πi s k / n} ds on the aperture's pixels
            a = np.exp(-(s[None] - c[:, None]) ** 2 / (4 * w_spot ** 2) + 1j * np.pi * beta * s[None] ** 2)
            return (a * ds) @ np.exp(-2j * np.pi * s[:, None] * k[None] / n)

        tx, ty = np.linspace(-3, 3, 13), np.linspace(-3, 3, 7)
        ex = lens_field(1.5 * tx, kx[inside])
        ey = lens_field(0.3 * ty, ky[inside])
        w = np.exp(-ty ** 2 / 2)[:, None] * np.exp(-tx ** 2 / 2)[None, :]
        a = pupil * ey[:, None, :] * ex[None, :, :] * np.sqrt(w / w.sum())[:, :, None]
        # the mutual intensity's eigenmodes on the aperture (SVD over the undulator points), strongest first
        vh = np.linalg.svd(a.reshape(-1, len(r)), full_matrices=False)[2]
        return _aperture_modes(vh[:K], inside, n), None
    raise ValueError(f"unknown mixture family {family!r}")


def spectrum(K: int, weakest: float, family: str = "") -> np.ndarray:
    """K power shares summing to 1, decreasing, the weakest ``weakest``: geometric (a GSM's spectrum
    truncated) for every family; one mode: [1]."""
    if K == 1:
        return np.ones(1)
    if K == 2:
        return np.array([1 - weakest, weakest])
    # geometric q^m, m = 0..K-1, with q^(K-1)/Σq^m = weakest (bisection on q in (0, 1])
    lo, hi = 1e-6, 1.0
    for _ in range(100):
        q = (lo + hi) / 2
        w = q ** np.arange(K)
        if w[-1] / w.sum() < weakest:
            lo = q
        else:
            hi = q
    w = q ** np.arange(K)
    return w / w.sum()


@dataclass
class Mixture:
    family: str
    shares: np.ndarray           # true power share of each mode (sum 1)
    probe: np.ndarray            # (K, n, n) the true modes, scaled to the photon count
    object: np.ndarray


def _object(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    H, W = shape
    y, x = np.mgrid[:H, :W]
    amp = np.full(shape, 0.9)
    for _ in range(int(H * W / 150)):
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(1.5, 6)
        amp -= 0.25 * ((y - cy) ** 2 + (x - cx) ** 2 < r * r)
    amp = np.clip(amp, 0.3, 1.0)
    noise = rng.standard_normal(shape)
    ky, kx = np.fft.fftfreq(H)[:, None], np.fft.fftfreq(W)[None, :]
    phase = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-(ky ** 2 + kx ** 2) / (2 * 0.04 ** 2))).real
    phase *= 1.2 / max(float(np.ptp(phase)), 1e-12)
    return amp * np.exp(1j * phase)


def mixture_scan(family: str, shares: np.ndarray | tuple[float, ...], photons: float, seed: int = 0, n: int = 64,
                 n_positions: int = 100, pattern: str | None = None, step: float = 8.0) -> tuple[ScanData, Mixture]:
    """A scan of the mixture ``family`` with the mode ``shares`` at ``photons`` counts a frame (Poisson).

    Positions: a jittered raster for ``fly`` (its fast axis along the columns), a Fermat spiral
    otherwise (``pattern`` 'raster' or 'spiral' to choose).
    """
    rng = np.random.default_rng(seed)
    w = np.asarray(shares, float)
    w = w / w.sum()
    shapes, _ = mode_shapes(family, len(w), n, np.random.default_rng(seed + 7919))
    pattern = pattern or ("raster" if family == "fly" else "spiral")
    if pattern == "raster":
        side = int(np.ceil(np.sqrt(n_positions)))
        r, c = np.divmod(np.arange(n_positions), side)
        pos = np.stack([r, c], 1) * step + rng.uniform(-0.1 * step, 0.1 * step, (n_positions, 2))
    else:
        i = np.arange(n_positions)
        rr = step * np.sqrt(i) * 0.57
        golden = np.pi * (3 - np.sqrt(5))
        pos = np.stack([rr * np.sin(i * golden), rr * np.cos(i * golden)], 1)
    pos -= pos.min(axis=0)
    corners = np.round(pos).astype(int) + 4
    H, W = int(corners[:, 0].max()) + n + 4, int(corners[:, 1].max()) + n + 4
    obj = _object((H, W), rng)
    probe = shapes * np.sqrt(w)[:, None, None]
    probe *= np.sqrt(photons / (np.sum(np.abs(probe) ** 2) * np.mean(np.abs(obj) ** 2)))
    frames = np.empty((n_positions, n, n))
    for j, (r0, c0) in enumerate(corners):
        frames[j] = np.sum(np.abs(np.fft.fft2(probe * obj[r0:r0 + n, c0:c0 + n], norm="ortho")) ** 2, axis=0)
    frames = rng.poisson(frames).astype(np.float64)
    lam = 1.2398419843320026 / ENERGY_KEV
    pixel_m = lam * 1e-9 * DISTANCE_M / (n * CCD_PIXEL_UM * 1e-6)
    points = np.stack([corners[:, 1], corners[:, 0]]).astype(float) * pixel_m * 1e6
    scan = ScanData(diffamp=np.sqrt(frames).astype(np.float32), points=points, lambda_nm=lam, z_m=DISTANCE_M,
                    ccd_pixel_um=CCD_PIXEL_UM, mask=None,
                    attrs={"scan_id": int(seed), "simulated": True, "photons": float(photons),
                           "probe_modes_true": len(w), "mixture": family})
    return scan, Mixture(family, w, probe, obj)
