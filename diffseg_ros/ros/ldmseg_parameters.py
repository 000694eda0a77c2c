"""ROS parameters of the ldmseg node: declaration with descriptions, validation, the cloud transform.

The model-shaping parameters are read-only; steps, resample, samples, seed and the time limits can be
changed at runtime (`ros2 param set /ldmseg steps 20`). tf2 is not installable here, so `cloud_to_camera`
is the one place a transform enters the node.
"""
import numpy as np
from rclpy.parameter import Parameter

from ..core.sd_models import DTYPES
from .parameters import ParameterError, Spec

T = Parameter.Type
IDENTITY = [float(v) for v in np.eye(4).reshape(-1)]
SPECS = (
    Spec('model_path', T.STRING, '',
         "local LDMSeg model folder (config.json, mask_autoencoder.safetensors, unet/, vae/, scheduler/); "
         "'' = the embedded SynthWorld model"),
    Spec('device', T.STRING, 'cpu', 'torch device for the model', constraints='cpu | cuda | cuda:N'),
    Spec('dtype', T.STRING, 'float32', 'model weights precision', constraints='float32 | float16 | bfloat16'),
    Spec('steps', T.INTEGER, 10, 'DDIM denoising steps per frame (the paper: PQ plateaus near 20)',
         read_only=False, constraints='1..1000'),
    Spec('resample', T.INTEGER, 0,
         "passes per denoising step where labels are known (RePaint's resampling: more agreement between "
         "known and completed segments, proportionally more compute); 0 = the model's setting "
         '(3 for the embedded model), 1 = the paper', read_only=False, constraints='0..20'),
    Spec('samples', T.INTEGER, 0,
         'completions drawn per frame (one batch) and merged by per-pixel vote: better boundaries, '
         "proportionally more compute; 0 = the model's setting (3 for the embedded model), 1 = the paper",
         read_only=False, constraints='0..16'),
    Spec('fill_void', T.BOOL, True,
         'dense output: connected pieces under the minimum segment area are dropped and every unsure pixel '
         "takes the nearest segment's id; false = the paper's post-processing (unsure pixels stay 0)"),
    Spec('seed', T.INTEGER, 0, 'seed of the initial noise, for reproducible completions', read_only=False,
         constraints='>= 0'),
    Spec('label_field', T.STRING, 'label',
         'name of the integer PointCloud2 field with the instance ids (ids <= 0 mean unlabelled)',
         constraints='not x, y or z'),
    Spec('cloud_to_camera', T.DOUBLE_ARRAY, IDENTITY,
         '4x4 rigid transform (16 floats, row-major) from the frame of the points to the camera optical '
         'frame. '
         'tf2 is not available here, so this is the only place a transform enters the node; '
         'identity = the cloud is already in the camera frame (e.g. ~/labeled_points fed back)',
         constraints='16 finite floats, last row 0 0 0 1, orthonormal rotation'),
    Spec('max_time_difference', T.DOUBLE, 1.0,
         'largest |image stamp - cloud stamp| in seconds of the cloud used for a frame (the closest in time '
         'is used); 0 = any age, e.g. a static map', read_only=False, constraints='>= 0'),
    Spec('use_depth', T.BOOL, True,
         'pair each image with the depth image of its stamp and publish ~/labeled_points; '
         'false = images alone, no ~/labeled_points'),
    Spec('depth_max_time_difference', T.DOUBLE, 0.01,
         'largest |image stamp - depth stamp| in seconds for an image and a depth image to form a frame',
         constraints='>= 0'),
    Spec('qos.image.reliability', T.STRING, 'best_effort',
         'reliability of the image, depth and camera_info subscriptions (SensorDataQoS is best_effort)',
         constraints='best_effort | reliable'),
    Spec('qos.image.depth', T.INTEGER, 5, 'history depth of the image, depth and camera_info subscriptions',
         constraints='1..100'),
    Spec('qos.points.reliability', T.STRING, 'best_effort', 'reliability of the points subscription',
         constraints='best_effort | reliable'),
    Spec('qos.points.depth', T.INTEGER, 2, 'history depth of the points subscription', constraints='1..100'),
    Spec('diagnostics_period', T.DOUBLE, 1.0, 'seconds between /diagnostics reports',
         constraints='0.05..3600'),
)
RUNTIME = tuple(spec.name for spec in SPECS if not spec.read_only)


def cloud_transform(values):
    """Return cloud_to_camera as a 4x4 array, or raise ParameterError when it is not a rigid transform."""
    matrix = np.asarray(values['cloud_to_camera'], dtype=float)
    if matrix.shape != (16,) or not np.isfinite(matrix).all():
        raise ParameterError(f'cloud_to_camera must be 16 finite floats (row-major 4x4), got '
                             f'{len(matrix)} value(s)')
    matrix = matrix.reshape(4, 4)
    rotation = matrix[:3, :3]
    rigid = np.allclose(matrix[3], [0, 0, 0, 1]) and np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4)
    if not rigid:
        raise ParameterError('cloud_to_camera must be a rigid transform: last row 0 0 0 1 and an orthonormal '
                             f'3x3 rotation, got {matrix.round(4).tolist()}')
    return matrix


def validate(values):
    """Check every parameter value; raise ParameterError naming the first bad one."""
    checks = [
        (values['device'].split(':')[0] in ('cpu', 'cuda'),
         f"device must be 'cpu' or 'cuda[:N]', got {values['device']!r}"),
        (values['dtype'] in DTYPES, f"dtype must be one of {sorted(DTYPES)}, got {values['dtype']!r}"),
        (1 <= values['steps'] <= 1000, f"steps must be 1..1000, got {values['steps']}"),
        (0 <= values['resample'] <= 20, f"resample must be 0..20, got {values['resample']}"),
        (0 <= values['samples'] <= 16, f"samples must be 0..16, got {values['samples']}"),
        (values['seed'] >= 0, f"seed must be >= 0, got {values['seed']}"),
        (values['label_field'] not in ('', 'x', 'y', 'z'),
         f"label_field must name a field other than x, y, z, got {values['label_field']!r}"),
        (values['max_time_difference'] >= 0,
         f"max_time_difference must be >= 0, got {values['max_time_difference']}"),
        (values['depth_max_time_difference'] >= 0,
         f"depth_max_time_difference must be >= 0, got {values['depth_max_time_difference']}"),
        (0.05 <= values['diagnostics_period'] <= 3600,
         f"diagnostics_period must be 0.05..3600 s, got {values['diagnostics_period']}"),
    ]
    for topic in ('image', 'points'):
        reliability, depth = values[f'qos.{topic}.reliability'], values[f'qos.{topic}.depth']
        checks += [(reliability in ('best_effort', 'reliable'),
                    f"qos.{topic}.reliability must be 'best_effort' or 'reliable', got {reliability!r}"),
                   (1 <= depth <= 100, f'qos.{topic}.depth must be 1..100, got {depth}')]
    for ok, message in checks:
        if not ok:
            raise ParameterError(message)
    cloud_transform(values)
