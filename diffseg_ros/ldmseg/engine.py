"""The label-completion node's model side (ROS-free): labelled clouds in, dense instance ids per frame out.

Clouds are kept by stamp as they arrive (any thread); for a frame, the cloud closest in time is
transformed into the camera frame, projected (pinhole, z-buffer) and completed by LDMSeg inpainting.
With the frame's depth the completed ids are lifted back to 3D, so they can be fed back as the next
frame's labels.
"""
from dataclasses import dataclass, field

import numpy as np

from ..core.frames import StampBuffer
from ..core.geometry import depth_to_points
from ..core.model_folder import apply_model_settings, ModelConfig
from ..core.settings import setting
from .pipeline import LDMSeg
from .projection import project_labels

IDENTITY = tuple(float(v) for v in np.eye(4).reshape(-1))
MAX_MONO16 = 65535


@dataclass
class LDMSegEngineConfig(ModelConfig):
    steps: int = setting(10, 'DDIM denoising steps per frame (the paper: PQ plateaus near 20)', low=1,
                         high=1000, runtime=True)
    resample: int = setting(0, "passes per denoising step where labels are known (RePaint's resampling: "
                               'more agreement between known and completed segments, proportionally more '
                               "compute); 0 = the model's setting (3 for the embedded model), 1 = the paper",
                            low=0, high=20, runtime=True)
    samples: int = setting(0, 'completions drawn per frame (one batch) and merged by per-pixel vote: better '
                              "boundaries, proportionally more compute; 0 = the model's setting (3 for the "
                              'embedded model), 1 = the paper', low=0, high=16, runtime=True)
    fill_void: bool = setting(True, 'dense output: connected pieces under the minimum segment area are '
                                    "dropped and every unsure pixel takes the nearest segment's id; false = "
                                    "the paper's post-processing (unsure pixels stay 0)")
    seed: int = setting(0, 'seed of the initial noise, for reproducible completions', low=0, runtime=True)
    cloud_to_camera: tuple[float, ...] = setting(
        IDENTITY, '4x4 rigid transform (16 floats, row-major) from the frame of the points to the camera '
                  'optical frame; tf2 is not available here, so this is the only place a transform enters '
                  'the node; identity = the cloud is already in the camera frame (e.g. ~/labeled_points '
                  'fed back)',
        constraint='16 finite floats, last row 0 0 0 1, orthonormal rotation')
    max_time_difference: float = setting(1.0, 'largest |image stamp - cloud stamp| in seconds of the cloud '
                                              'used for a frame (the closest in time is used); 0 = any age, '
                                              'e.g. a static map', low=0.0, runtime=True)

    def invariants(self):
        yield from super().invariants()
        matrix = np.asarray(self.cloud_to_camera, dtype=float)
        if matrix.shape != (16,) or not np.isfinite(matrix).all():
            yield (False, 'cloud_to_camera must be 16 finite floats (row-major 4x4), got '
                          f'{len(matrix)} value(s)')
            return
        matrix = matrix.reshape(4, 4)
        rotation = matrix[:3, :3]
        rigid = (np.allclose(matrix[3], [0, 0, 0, 1])
                 and np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4))
        yield (rigid, 'cloud_to_camera must be a rigid transform: last row 0 0 0 1 and an orthonormal 3x3 '
                      f'rotation, got {matrix.round(4).tolist()}')

    @property
    def transform(self):
        return np.asarray(self.cloud_to_camera, dtype=float).reshape(4, 4)


@dataclass
class Cloud:
    frame_id: str
    xyz: np.ndarray                  # float [N, 3]
    labels: np.ndarray               # int [N], 0 = unlabelled


@dataclass
class Completion:
    """A frame's result: ids (None when it could not be completed) and why, or warnings about the inputs."""

    ids: np.ndarray = None           # int64 [H, W]: the cloud's ids where it had labels, fresh ids above
    points: np.ndarray = None        # float32 [H, W, 3]: the frame's depth lifted to 3D (with depth only)
    waiting_for: str = ''            # 'points' or 'camera_info' (nothing to complete with yet)
    detail: str = ''                 # why it waits, or why the frame failed
    failed: bool = False
    warnings: list = field(default_factory=list)


class LDMSegEngine:
    """Raises ModelLoadError (model) or ValueError (configuration) from the constructor."""

    def __init__(self, config):
        self.config = config.validate()
        self.model = LDMSeg.load(config.model_path, config.device, config.dtype, fill_void=config.fill_void)
        apply_model_settings(config, convolutional=(self.model.unet, self.model.vae),
                             compiled=(self.model.unet, self.model.vae.encoder))
        self.clouds = StampBuffer(keep=4)

    def update(self, config):
        """Use changed settings from the next frame on (steps, resample, samples, seed, time limit)."""
        self.config = config.validate()

    def close(self):
        """Stop nothing: the model is freed with the engine (QueryEngine.close stops its training)."""

    def describe(self):
        """Facts for diagnostics: model, device, precision and the effective inference settings."""
        c, model = self.config, self.model.config
        return {'model': getattr(self.model, 'path', ''), 'device': c.device, 'dtype': c.dtype,
                'steps': c.steps, 'resample': c.resample or model.resample,
                'samples': c.samples or model.samples, 'fill void': c.fill_void}

    def add_cloud(self, stamp, frame_id, xyz, labels):
        """Keep a parsed labelled cloud (any thread); ids <= 0 mean unlabelled."""
        self.clouds.add(stamp, Cloud(frame_id, xyz, np.maximum(labels, 0)))

    def complete(self, frame, camera):
        """Complete the labels of the cloud closest in time to a SensorFrame seen by `camera` (or None)."""
        cloud, gap = self.clouds.nearest(frame.stamp)
        limit = self.config.max_time_difference
        if cloud is None:
            return Completion(waiting_for='points')
        if limit and gap > limit:
            return Completion(waiting_for='points', detail=f'the nearest cloud is {gap:.3f} s from the image '
                                                           f'(max_time_difference {limit} s)')
        if camera is None:
            return Completion(waiting_for='camera_info')
        problem = frame_problem(frame, camera)
        if problem:
            return Completion(failed=True, detail=problem)
        warnings = []
        transform = self.config.transform
        if cloud.frame_id != frame.frame_id and np.array_equal(transform, np.eye(4)):
            warnings.append(f"the cloud's frame '{cloud.frame_id}' is not the image's '{frame.frame_id}' but "
                            'cloud_to_camera is the identity: set it to the pose of the cloud frame in the '
                            'camera frame')
        sparse = project_labels(cloud.xyz, cloud.labels, camera.K, camera.width, camera.height, transform)
        if not sparse.any():
            warnings.append('no labelled point of the cloud falls into the image: completing without labels')
        c = self.config
        ids = self.model.complete(frame.rgb, sparse, steps=c.steps, seed=c.seed, resample=c.resample,
                                  samples=c.samples)
        if ids.max() > MAX_MONO16:
            return Completion(failed=True, warnings=warnings,
                              detail=f'instance id {ids.max()} does not fit ~/instances (mono16, ids up to '
                                     f'{MAX_MONO16}); relabel the cloud with smaller ids')
        points = None if frame.depth is None else depth_to_points(frame.depth, camera.K).astype(np.float32)
        return Completion(ids, points, warnings=warnings)


def frame_problem(frame, camera):
    """Return why a frame cannot be completed with this camera ('' when it can)."""
    height, width = frame.rgb.shape[:2]
    if (camera.width, camera.height) != (width, height):
        return f'camera_info is {camera.width}x{camera.height} but the image is {width}x{height}'
    if frame.depth is not None and frame.depth.shape != (height, width):
        depth_height, depth_width = frame.depth.shape
        return f'depth image is {depth_width}x{depth_height} but the image is {width}x{height}'
    return ''
