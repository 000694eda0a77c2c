"""Settings declared once: each field carries its default, range or choices, description, runtime flag.

    @dataclass
    class Config:
        steps: int = setting(10, 'DDIM steps per frame', low=1, high=1000, runtime=True)
        learn: LearnConfig = section(LearnConfig, 'learn')      # fields become learn.steps, learn.size, ...

Everything else is derived from these declarations: validation (`validate`), ROS parameters with their
descriptors (`ros/params.py`), the parameter files in `config/` (`yaml_text`) and command-line flags
(`add_arguments` / `from_arguments`). A config class may add checks across fields in `invariants()`,
returning (ok, message) pairs.
"""
import argparse
from dataclasses import dataclass, field, fields, is_dataclass, replace
import typing


@dataclass(frozen=True)
class Rule:
    description: str
    low: object = None           # inclusive bounds (exclusive where named in `open`)
    high: object = None
    open: tuple = ()             # 'low' and/or 'high': that bound is excluded
    choices: tuple = ()
    also: tuple = ()             # values allowed outside [low, high], e.g. 0 = 'the model's default'
    runtime: bool = False        # may change while the node runs
    exposed: bool = True         # a ROS parameter and config-file entry (False: library and CLI only)
    constraint: str = ''         # how to state the allowed values when the rule cannot say it


class Settings:
    """Base of config classes declared with `setting`: adds `validate()`."""

    def validate(self):
        """Return the config, or raise ValueError with the first problem."""
        return validate(self)


def setting(default, description, **rule):
    """Declare a config field: `default`, `description` and the Rule's keywords (low, high, choices, ...)."""
    return field(default=default, metadata={'rule': Rule(description, **rule)})


def section(factory, prefix):
    """Declare a nested config whose fields are named `prefix.field` ('' = at the parent's level).

    factory: the section's class, or a callable making its default (e.g. other defaults than the class's).
    """
    return field(default_factory=factory, metadata={'section': prefix})


@dataclass(frozen=True)
class Item:
    name: str                    # dotted name: 'learn.steps'
    path: tuple                  # attribute path from the root config: ('learn', 'steps')
    rule: Rule
    type: object                 # str, int, float, bool, or tuple[int | float | str, ...]
    default: object

    @property
    def element(self):
        """Element type of a tuple setting (None for scalars)."""
        args = typing.get_args(self.type)
        return args[0] if typing.get_origin(self.type) is tuple else None


def items(config_or_class, prefix='', path=()):
    """Every setting of a config class or instance, sections flattened, in declaration order.

    Defaults are those of the class's default instance (a section may default to other values).
    """
    config = config_or_class() if isinstance(config_or_class, type) else config_or_class
    defaults = type(config)()
    hints = typing.get_type_hints(type(config))
    out = []
    for f in fields(config):
        if 'section' in f.metadata:
            out += [replace(item, default=_follow(getattr(defaults, f.name), item.path[len(path) + 1:]))
                    for item in items(getattr(config, f.name), _join(prefix, f.metadata['section']),
                                      path + (f.name,))]
        elif 'rule' in f.metadata:
            out.append(Item(_join(prefix, f.name), path + (f.name,), f.metadata['rule'], hints[f.name],
                            getattr(defaults, f.name)))
    return out


def _follow(config, path):
    for attr in path:
        config = getattr(config, attr)
    return config


def _join(prefix, name):
    return f'{prefix}.{name}' if prefix and name else prefix or name


def get(config, item):
    return _follow(config, item.path)


def with_values(config, values):
    """Return a copy of config with {dotted name: value} applied (unknown names raise KeyError)."""
    by_name = {item.name: item for item in items(config)}
    nested = {}
    for name, value in values.items():
        item = by_name[name]
        nested.setdefault(item.path[:-1], {})[item.path[-1]] = coerce(item, value)
    for path in sorted(nested, key=len, reverse=True):
        parent = config
        for attr in path:
            parent = getattr(parent, attr)
        updated = replace(parent, **nested[path])
        config = _set_path(config, path, updated)
    return config


def _set_path(config, path, value):
    if not path:
        return value
    child = getattr(config, path[0])
    return replace(config, **{path[0]: _set_path(child, path[1:], value)})


def coerce(item, value):
    """Convert a value read from ROS, YAML or JSON to the declared type (lists become tuples)."""
    if item.element is not None:
        return tuple(item.element(v) for v in (value or ()))
    if item.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# --- validation -------------------------------------------------------------------------------------------
def allowed(item):
    """How the allowed values of a setting read in a message: '1..100', '[0, 1)', "'cpu' or 'cuda'"."""
    rule = item.rule
    if rule.constraint:
        return rule.constraint
    if rule.choices:
        quoted = [repr(c) for c in rule.choices]
        return ' or '.join(quoted) if len(quoted) == 2 else 'one of ' + ', '.join(quoted)
    if rule.low is None and rule.high is None:
        return ''
    kind = item.element or item.type
    if rule.high is None:
        text = f"{'>' if 'low' in rule.open else '>='} {rule.low}"
    elif kind is int:
        text = f'{rule.low}..{rule.high}'
    else:
        text = (f"in {'(' if 'low' in rule.open else '['}{_number(rule.low)}, {_number(rule.high)}"
                f"{')' if 'high' in rule.open else ']'}")
    if rule.also:
        text = ' or '.join(str(v) for v in rule.also) + ' or ' + text.removeprefix('in ')
    return text


def _number(value):
    return int(value) if float(value).is_integer() else value


def _within(rule, value):
    if value in rule.also:
        return True
    if rule.choices:
        return value in rule.choices
    low_ok = rule.low is None or (value > rule.low if 'low' in rule.open else value >= rule.low)
    high_ok = rule.high is None or (value < rule.high if 'high' in rule.open else value <= rule.high)
    return low_ok and high_ok


def _type_ok(kind, value):
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def problems(config):
    """Messages for every value outside its rule, then for every failed invariant (sections first)."""
    out = []
    for item in items(config):
        value = get(config, item)
        values = value if item.element is not None else (value,)
        kind = item.element or item.type
        if item.element is not None and not isinstance(value, tuple):
            out.append(f'{item.name} must be a list, got {value!r}')
        elif not all(_type_ok(kind, v) for v in values):
            out.append(f'{item.name} must be {kind.__name__}, got {value!r}')
        elif not all(_within(item.rule, v) for v in values):
            out.append(f'{item.name} must be {allowed(item)}, got {value!r}')
    for node in _sections(config):
        out += [message for ok, message in getattr(node, 'invariants', lambda: [])() if not ok]
    return out


def _sections(config):
    """Return the config's nested sections (deepest first), then the config itself."""
    out = []
    for f in fields(config):
        if 'section' in f.metadata:
            out += _sections(getattr(config, f.name))
    return out + [config]


def validate(config):
    """Return config, or raise ValueError with the first problem."""
    found = problems(config)
    if found:
        raise ValueError(found[0])
    return config


# --- parameter files and command lines ---------------------------------------------------------------------
def yaml_text(node_name, config_class, header):
    """Return the YAML parameter file of a node, generated from its settings (comments from the rules)."""
    lines = [f'# {line}' if line else '#' for line in header.splitlines()]
    lines += [f'{node_name}:', '  ros__parameters:']
    opened = []
    for item in items(config_class):
        if not item.rule.exposed:
            continue
        *groups, leaf = item.name.split('.')
        common = 0
        while common < min(len(groups), len(opened)) and groups[common] == opened[common]:
            common += 1
        opened = opened[:common]
        for group in groups[common:]:
            lines.append('    ' + '  ' * len(opened) + f'{group}:')
            opened.append(group)
        indent = '    ' + '  ' * len(opened)
        lines += [f'{indent}# {part}' for part in _describe(item)]
        lines.append(f'{indent}{leaf}: {_yaml_value(item.default)}')
    return '\n'.join(lines) + '\n'


def _describe(item):
    """Comment lines of a setting: its description, allowed values, and whether it changes at run time."""
    text = item.rule.description + '.'
    constraint = allowed(item).removeprefix('in ')
    text += f' Allowed: {constraint}.' if constraint else ''
    text += ' Runtime (ros2 param set).' if item.rule.runtime else ''
    return _wrap(text, 100)


def _wrap(text, width):
    lines, line = [], ''
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f'{line} {word}' if line else word
    return lines + ([line] if line else [])


def _yaml_value(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return f"'{value}'" if value == '' or not value.replace('_', '').replace('.', '').isalnum() else value
    if isinstance(value, tuple):
        return '[' + ', '.join(_yaml_value(v) for v in value) + ']'
    return repr(value)


def add_arguments(parser, config_class, prefix=''):
    """Add a --flag per setting of config_class (dots and underscores as dashes), defaults from it."""
    for item in items(config_class):
        flag = '--' + _join(prefix, item.name).replace('.', '-').replace('_', '-')
        help_text = item.rule.description
        if item.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=item.default,
                                help=help_text)
        elif item.element is not None:
            parser.add_argument(flag, type=item.element, nargs='*', default=list(item.default),
                                help=help_text)
        else:
            parser.add_argument(flag, type=item.type, default=item.default, help=help_text,
                                choices=item.rule.choices or None)


def from_arguments(config_class, args, prefix=''):
    """Build a validated config from parsed arguments (the flags of add_arguments)."""
    values = {item.name: getattr(args, _join(prefix, item.name).replace('.', '_').replace('-', '_'))
              for item in items(config_class)}
    return validate(with_values(config_class(), values))


def to_dict(config):
    """{dotted name: value} of every setting."""
    return {item.name: get(config, item) for item in items(config)}


def is_config(value):
    return is_dataclass(value) and not isinstance(value, type)
