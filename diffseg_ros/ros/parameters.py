"""ROS parameters of the diffseg node: declaration, reading, validation, mapping to SegmenterConfig.

Engine parameters take their defaults from SegmenterConfig (instances.* from PersonalConfig, learn.* from
LearnSettings) so the node and the library cannot drift. Parameters that shape the model or the text
embedding are read-only; thresholds and the overlay opacity can be tuned at runtime
(`ros2 param set /diffseg box_threshold 0.3`).
"""
from dataclasses import dataclass, fields, replace

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.parameter import Parameter

from ..core.instances import PersonalConfig
from ..core.segmenter import SegmenterConfig
from ..training.custom_diffusion import LearnSettings

ENGINE_DEFAULTS = SegmenterConfig()
PERSONAL_DEFAULTS = PersonalConfig()
LEARN_DEFAULTS = LearnSettings()
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
    _engine('method', T.STRING, "segmentation method: T2M SelfCross, StableSeg, or plain cross-attention; "
            "'' = the model's recommendation (its diffseg_defaults.json, with its CRF choice), else t2m",
            constraints="'' | t2m | stableseg | cross"),
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
    _engine('crf', T.BOOL, "refine masks with a dense CRF (slower); method '' may turn it on as the model "
            'recommends'),
    Spec('qos.image.reliability', T.STRING, 'best_effort',
         'reliability of the image subscription (SensorDataQoS is best_effort)',
         constraints='best_effort | reliable'),
    Spec('qos.image.depth', T.INTEGER, 5, 'history depth of the image subscription', constraints='1..100'),
    Spec('overlay_alpha', T.DOUBLE, 0.5, 'opacity of the mask colours in ~/overlay', read_only=False,
         constraints='0..1'),
    Spec('diagnostics_period', T.DOUBLE, 1.0, 'seconds between /diagnostics reports',
         constraints='0.05..3600'),
    # Personal concepts, instances, 3D centroids and markers
    Spec('concepts_dir', T.STRING, '',
         "folder of personal concepts (one subfolder each, `diffseg concept learn --out`); '' = none"),
    Spec('instances.max_segments', T.INTEGER, PERSONAL_DEFAULTS.max_segments,
         'upper bound of the instances a class word is split into', constraints='1..32'),
    Spec('instances.min_score', T.DOUBLE, PERSONAL_DEFAULTS.min_score,
         'a query is assigned no instance when its best joint score is below this', constraints='0..1'),
    Spec('depth_tolerance', T.DOUBLE, 0.05,
         'largest stamp difference (s) between an image and the depth frame used for its 3D centroids',
         constraints='0..10'),
    Spec('marker_lifetime', T.DOUBLE, 0.0, 'lifetime (s) of ~/markers; 0 = twice the measured result period',
         read_only=False, constraints='0..3600'),
    # Learning a concept from the camera (~/learn)
    Spec('learn.frames', T.INTEGER, 5, 'frames whose class-word segment is cropped for a learn request',
         constraints='1..100'),
    Spec('learn.margin', T.DOUBLE, 0.15, 'margin around the segment box of a crop, as a fraction of its size',
         constraints='0..2'),
    Spec('learn.timeout', T.DOUBLE, 60.0, 'seconds to wait for the frames of a learn request',
         constraints='1..3600'),
    Spec('learn.steps', T.INTEGER, LEARN_DEFAULTS.steps, 'Custom Diffusion training steps',
         constraints='1..100000'),
    Spec('learn.batch', T.INTEGER, LEARN_DEFAULTS.batch, 'crops per training step', constraints='1..64'),
    Spec('learn.size', T.INTEGER, LEARN_DEFAULTS.size,
         'training image size in px; 0 = the size the model was trained at',
         constraints='0 or 8..2048'),
    Spec('learn.class_count', T.INTEGER, LEARN_DEFAULTS.class_count,
         'class images generated for prior preservation; 0 = none', constraints='0..1000'),
    Spec('learn.sample_steps', T.INTEGER, LEARN_DEFAULTS.sample_steps, 'DDIM steps per generated class image',
         constraints='1..1000'),
    Spec('learn.seed', T.INTEGER, LEARN_DEFAULTS.seed, 'seed of the training'),
)
ENGINE_FIELDS = {f.name for f in fields(SegmenterConfig)}
NODE_ONLY = tuple(spec.name for spec in SPECS if spec.name not in ENGINE_FIELDS)
# (name, lowest, highest) of the numeric node parameters, checked at start and on runtime changes
RANGES = (('qos.image.depth', 1, 100), ('instances.max_segments', 1, 32), ('instances.min_score', 0.0, 1.0),
          ('depth_tolerance', 0.0, 10.0), ('marker_lifetime', 0.0, 3600.0), ('learn.frames', 1, 100),
          ('learn.margin', 0.0, 2.0), ('learn.timeout', 1.0, 3600.0), ('learn.steps', 1, 100000),
          ('learn.batch', 1, 64), ('learn.class_count', 0, 1000), ('learn.sample_steps', 1, 1000))


class ParameterError(ValueError):
    """A parameter value the node cannot start (or continue) with."""


def declare_parameters(node, specs=None, validate=None):
    """Declare every parameter (typed, described); return {name: value} or raise ParameterError.

    specs / validate default to this node's SPECS and validate_node_values; other nodes pass their own.
    """
    values = {}
    for spec in SPECS if specs is None else specs:
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
    (validate or validate_node_values)(values)
    return values


def _without_suffix(err, name):
    """Return rclpy's message without its trailing ': <name>'."""
    text = str(err).splitlines()[0]
    return text[:-len(name) - 2] if text.endswith(': ' + name) else text


def validate_node_values(values):
    """Check the parameters the node itself uses; raise ParameterError naming the bad one."""
    reliability = values['qos.image.reliability']
    alpha, period = values['overlay_alpha'], values['diagnostics_period']
    size = values['learn.size']
    checks = [
        (reliability in ('best_effort', 'reliable'),
         f"qos.image.reliability must be 'best_effort' or 'reliable', got {reliability!r}"),
        (0.0 <= alpha <= 1.0, f'overlay_alpha must be in [0, 1], got {alpha}'),
        (0.05 <= period <= 3600, f'diagnostics_period must be 0.05..3600 s, got {period}'),
        (size == 0 or 8 <= size <= 2048, f'learn.size must be 0 or 8..2048, got {size}'),
    ]
    checks += [(low <= values[name] <= high, f'{name} must be {low}..{high}, got {values[name]}')
               for name, low, high in RANGES]
    for ok, message in checks:
        if not ok:
            raise ParameterError(message)


def segmenter_config(values):
    """Build the SegmenterConfig of parameter values; raise ParameterError for values the engine refuses."""
    engine_values = {name: value for name, value in values.items() if name not in NODE_ONLY}
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


def personal_config(values):
    """Build the PersonalConfig (instance path) of the parameter values."""
    return PersonalConfig(max_segments=values['instances.max_segments'],
                          min_score=values['instances.min_score']).validate()


def learn_settings(values):
    """Build the LearnSettings (Custom Diffusion) of the learn.* parameter values."""
    names = ('steps', 'batch', 'size', 'class_count', 'sample_steps', 'seed')
    return replace(LEARN_DEFAULTS, **{name: values['learn.' + name] for name in names})
