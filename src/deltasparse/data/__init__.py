"""Video data for deltasparse: real video folders (UCF101 layout + official splits, or plain
class folders) and a procedural synthetic action set that needs no download.

The paper this package implements (Yousefzadeh & Sifalakis, arXiv 2107.07305) trains
MobileNet v1 per frame on UCF101; ``VideoFolder`` reads that data, ``SyntheticActions`` is
the default stand-in for tests and demos, and ``write_ucf101_layout`` turns the synthetic set
into real video files in the UCF101 layout.
"""

from .cache import FrameCache
from .decode import VIDEO_EXTENSIONS, decode_video, probe_video
from .encode import write_video
from .errors import CorruptVideoWarning, DatasetError, VideoDecodeError
from .sampling import clip_indices, even_starts, random_start
from .synthetic import MOTIONS, SyntheticActions, render_video
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop,
    hflip,
    normalize,
    normalize_frames,
    random_crop,
    resize,
)
from .ucf101_writer import WrittenLayout, write_class_folders, write_ucf101_layout
from .video_folder import VideoFolder

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOTIONS",
    "VIDEO_EXTENSIONS",
    "CorruptVideoWarning",
    "DatasetError",
    "FrameCache",
    "SyntheticActions",
    "VideoDecodeError",
    "VideoFolder",
    "WrittenLayout",
    "center_crop",
    "clip_indices",
    "decode_video",
    "even_starts",
    "hflip",
    "normalize",
    "normalize_frames",
    "probe_video",
    "random_crop",
    "random_start",
    "render_video",
    "resize",
    "write_class_folders",
    "write_ucf101_layout",
    "write_video",
]
