"""ROS parameters of a node, generated from its settings class (core/settings.py).

Every exposed setting becomes a typed parameter whose descriptor carries the description, the allowed
values and the range, so `ros2 param set` refuses out-of-range values itself; settings not marked
`runtime` are read-only. Values are checked again by the settings' own rules (and their cross-field
invariants) at start and on every runtime change, and refused with one line naming the parameter.
"""
import sys

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.parameter import Parameter

from ..core.settings import allowed, items, problems, with_values

TYPES = {bool: Parameter.Type.BOOL, int: Parameter.Type.INTEGER, float: Parameter.Type.DOUBLE,
         str: Parameter.Type.STRING}
ARRAY_TYPES = {int: Parameter.Type.INTEGER_ARRAY, float: Parameter.Type.DOUBLE_ARRAY,
               str: Parameter.Type.STRING_ARRAY}


class ParameterError(ValueError):
    """A parameter value the node cannot start (or continue) with."""


def parameter_type(item):
    return ARRAY_TYPES[item.element] if item.element is not None else TYPES[item.type]


def descriptor(item, with_range=True):
    """Return the descriptor of a setting: description, read-only unless runtime, allowed values, range."""
    rule = item.rule
    out = ParameterDescriptor(description=rule.description, read_only=not rule.runtime,
                              additional_constraints=allowed(item))
    kind = item.element or item.type
    if not with_range or kind not in (int, float) or (rule.low is None and rule.high is None) or rule.choices:
        return out
    low = min([rule.low, *rule.also]) if rule.low is not None else None
    high = max([rule.high, *rule.also]) if rule.high is not None else None
    if kind is int:
        out.integer_range = [IntegerRange(from_value=-2 ** 63 if low is None else int(low),
                                          to_value=2 ** 63 - 1 if high is None else int(high), step=0)]
    else:
        out.floating_point_range = [FloatingPointRange(from_value=-sys.float_info.max if low is None else low,
                                                       to_value=sys.float_info.max if high is None else high,
                                                       step=0.0)]
    return out


def declare_settings(node, settings_class):
    """Declare a parameter per exposed setting; return the validated settings or raise ParameterError."""
    values = {}
    for item in items(settings_class):
        if not item.rule.exposed:
            continue
        # An empty list cannot be a default: rclpy would type the parameter as a byte array. Such
        # parameters are declared by type only; they read None when unset (also from a YAML `[]`).
        initial = parameter_type(item) if item.default == () else _ros_value(item.default)
        try:
            try:
                param = node.declare_parameter(item.name, initial, descriptor(item))
            except InvalidParameterValueException:   # out of range: the settings' rules say it below
                param = node.declare_parameter(item.name, initial, descriptor(item, with_range=False))
        except InvalidParameterTypeException as err:
            raise ParameterError(f'{item.name}: {_without_suffix(err, item.name)}') from None
        values[item.name] = item.default if param.value is None else param.value
    return _checked(settings_class(), values)


def changed_settings(settings, params):
    """Return settings with runtime parameter changes applied; raise ParameterError for a refused value.

    rclpy has already refused wrong types, read-only names and values outside the descriptor's range;
    parameters that are not settings (e.g. use_sim_time) are ignored.
    """
    names = {item.name for item in items(settings) if item.rule.exposed}
    return _checked(settings, {p.name: p.value for p in params if p.name in names})


def _checked(settings, values):
    try:
        settings = with_values(settings, values)
    except (TypeError, ValueError) as err:
        raise ParameterError(str(err)) from None
    found = problems(settings)
    if found:
        raise ParameterError(found[0])
    return settings


def _ros_value(value):
    return list(value) if isinstance(value, tuple) else value


def _without_suffix(err, name):
    """Return rclpy's message without its trailing ': <name>'."""
    text = str(err).splitlines()[0]
    return text[:-len(name) - 2] if text.endswith(': ' + name) else text
