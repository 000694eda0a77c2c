"""ROS parameters of the diffseg node: declaration, reading, validation, mapping to SegmenterConfig.

Engine parameters take their defaults from SegmenterConfig so the node and the library cannot drift.
Parameters that shape the model or the text embedding are read-only; thresholds and the overlay
opacity can be tuned at runtime (`ros2 param set /diffseg box_threshold 0.3`).
"""
from dataclasses import dataclass, fields, replace

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.parameter import Parameter

from ..core.segmenter import SegmenterConfig

ENGINE_DEFAULTS = SegmenterConfig()
T = Parameter.Type


@dataclass(frozen=True)
class Spec:
    name: str
    type: Parameter.Type
    default: object
    description: str
    read_only: bool = True
    constraints: str = ''


def _engine(name, type_, description, read_only=True, constraints=''):
    """Spec of an engine parameter whose default comes from SegmenterConfig."""
    default = getattr(ENGINE_DEFAULTS, name, None)
    if type_ in (T.INTEGER_ARRAY, T.STRING_ARRAY):
        default = list(default or [])
    return Spec(name, type_, default, description, read_only, constraints)


SPECS = (
    _engine('model_path', T.STRING,
            "local diffusers Stable Diffusion folder; '' = the embedded SynthWorld model"),
    _engine('device', T.STRING, 'torch device for the model', constraints="cpu | cuda | cuda:N"),
    _engine('dtype', T.STRING, 'model weights precision', constraints='float32 | float16 | bfloat16'),
    _engine('method', T.STRING, 'segmentation method: T2M SelfCross, StableSeg, or plain cross-attention',
            constraints='t2m | stableseg | cross'),
    _engine('image_size', T.INTEGER, 'long side in pixels of the image fed to the model; 0 = model default',
            constraints='0 or 64..2048'),
    _engine('timestep', T.INTEGER, 'diffusion timestep of the one UNet forward; -1 = method default',
            constraints='-1 or 0..999'),
    _engine('noise_samples', T.INTEGER, 't2m: noise draws averaged (batched in the one forward)',
            constraints='1..32'),
    _engine('seed', T.INTEGER, 'seed of the noise draws (t2m), for reproducible masks'),
    _engine('cross_layers', T.INTEGER_ARRAY,
            'transformer-block indices (forward order) whose cross-attention is used; '
            'empty = method default'),
    _engine('self_layers', T.INTEGER_ARRAY,
            'transformer-block indices (forward order) whose self-attention is used; empty = method default'),
    _engine('background_words', T.STRING_ARRAY,
            'words added to the prompt to absorb background attention (no output channel); '
            'empty = model default'),
    _engine('background_threshold', T.DOUBLE, 'cross / stableseg: constant background score',
            read_only=False, constraints='0..1'),
    _engine('box_threshold', T.DOUBLE, "t2m: box around regions >= this x the query's max cross-attention",
            read_only=False, constraints='(0, 1]'),
    _engine('tau', T.DOUBLE, 't2m: background score (2 tau - max_k SC_k)^2', read_only=False,
            constraints='(0, 1]'),
    _engine('mask_threshold', T.DOUBLE, "minimum probability for a pixel to count as a query's foreground",
            read_only=False, constraints='[0, 1)'),
    Spec('crf', T.BOOL, False, 'refine masks with a dense CRF (slower)'),
    Spec('qos.image.reliability', T.STRING, 'best_effort',
         'reliability of the image subscription (SensorDataQoS is best_effort)',
         constraints='best_effort | reliable'),
    Spec('qos.image.depth', T.INTEGER, 5, 'history depth of the image subscription', constraints='1..100'),
    Spec('overlay_alpha', T.DOUBLE, 0.5, 'opacity of the mask colours in ~/overlay', read_only=False,
         constraints='0..1'),
    Spec('diagnostics_period', T.DOUBLE, 1.0, 'seconds between /diagnostics reports',
         constraints='0.05..3600'),
)
ENGINE_FIELDS = {f.name for f in fields(SegmenterConfig)}
NODE_ONLY = ('crf', 'qos.image.reliability', 'qos.image.depth', 'overlay_alpha', 'diagnostics_period')


class ParameterError(ValueError):
    """A parameter value the node cannot start (or continue) with."""


def declare_parameters(node):
    """Declare every parameter (typed, described); return {name: value} or raise ParameterError."""
    values = {}
    for spec in SPECS:
        descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only,
                                         additional_constraints=spec.constraints)
        # An empty list cannot be a default: rclpy would type the parameter as a byte array. Such
        # parameters are declared by type only; they read None when unset (also from a YAML `[]`).
        initial = spec.type if spec.default == [] else spec.default
        try:
            param = node.declare_parameter(spec.name, initial, descriptor)
        except (InvalidParameterTypeException, InvalidParameterValueException) as err:
            raise ParameterError(f'{spec.name}: {_without_suffix(err, spec.name)}') from None
        values[spec.name] = spec.default if param.value is None else param.value
    validate_node_values(values)
    return values


def _without_suffix(err, name):
    """Return rclpy's message without its trailing ': <name>'."""
    text = str(err).splitlines()[0]
    return text[:-len(name) - 2] if text.endswith(': ' + name) else text


def validate_node_values(values):
    """Check the parameters the node itself uses; raise ParameterError naming the bad one."""
    reliability, depth = values['qos.image.reliability'], values['qos.image.depth']
    alpha, period = values['overlay_alpha'], values['diagnostics_period']
    checks = [
        (reliability in ('best_effort', 'reliable'),
         f"qos.image.reliability must be 'best_effort' or 'reliable', got {reliability!r}"),
        (1 <= depth <= 100, f'qos.image.depth must be 1..100, got {depth}'),
        (0.0 <= alpha <= 1.0, f'overlay_alpha must be in [0, 1], got {alpha}'),
        (0.05 <= period <= 3600, f'diagnostics_period must be 0.05..3600 s, got {period}'),
    ]
    for ok, message in checks:
        if not ok:
            raise ParameterError(message)


def segmenter_config(values):
    """Build the SegmenterConfig of parameter values; raise ParameterError for values the engine refuses."""
    engine_values = {name: value for name, value in values.items() if name not in NODE_ONLY}
    if values['crf'] and 'crf' not in ENGINE_FIELDS:
        raise ParameterError('crf is true but this version of the segmentation engine has no CRF refinement')
    if 'crf' in ENGINE_FIELDS:
        engine_values['crf'] = values['crf']
    engine_values['cross_layers'] = tuple(engine_values['cross_layers'])
    engine_values['self_layers'] = tuple(engine_values['self_layers'])
    engine_values['background_words'] = tuple(engine_values['background_words']) or None
    config = SegmenterConfig(**engine_values)
    try:
        return config.validate()
    except ValueError as err:
        raise ParameterError(str(err)) from None


def updated_config(config, params):
    """Config with runtime parameter changes applied, validated; raise ParameterError if refused."""
    changes = {}
    for param in params:
        if param.name in ENGINE_FIELDS:   # rclpy has already refused wrong types and read-only names
            changes[param.name] = param.value
    try:
        return replace(config, **changes).validate()
    except ValueError as err:
        raise ParameterError(str(err)) from None
