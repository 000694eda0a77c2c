"""Stand-ins for launch and launch_ros (not installable here), so the launch files run in the tests.

Actions record their arguments; LaunchConfiguration reads the launch arguments of a Context;
run_launch() declares the arguments, runs the OpaqueFunctions and returns the actions a launch would
start, in order. Only what the package's launch files use is stood in for.
"""
import importlib.util
import sys
import types


class Recorded:
    """An action or substitution that only remembers how it was made."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchDescription(Recorded):
    pass


class DeclareLaunchArgument(Recorded):
    pass


class OpaqueFunction(Recorded):
    pass


class SetEnvironmentVariable(Recorded):
    pass


class Node(Recorded):
    pass


class LifecycleNode(Node):
    """launch_ros's LifecycleNode needs a name and a namespace."""

    def __init__(self, **kwargs):
        if 'name' not in kwargs or 'namespace' not in kwargs:
            raise TypeError('LifecycleNode needs name= and namespace=')
        super().__init__(**kwargs)


class LaunchConfiguration:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context.launch_configurations[self.name]


class PathJoinSubstitution(Recorded):
    def perform(self, context):
        return '/'.join(perform(part, context) for part in self.args[0])


class FindPackageShare(Recorded):
    def perform(self, context):
        return f'/opt/share/{self.args[0]}'


class Context:
    def __init__(self):
        self.launch_configurations = {}


def perform(value, context):
    """Return the text of a string or a substitution."""
    return value if isinstance(value, str) else value.perform(context)


MODULES = {
    'launch': {'LaunchDescription': LaunchDescription},
    'launch.actions': {'DeclareLaunchArgument': DeclareLaunchArgument, 'OpaqueFunction': OpaqueFunction,
                       'SetEnvironmentVariable': SetEnvironmentVariable},
    'launch.substitutions': {'LaunchConfiguration': LaunchConfiguration,
                             'PathJoinSubstitution': PathJoinSubstitution},
    'launch_ros': {},
    'launch_ros.actions': {'Node': Node, 'LifecycleNode': LifecycleNode},
    'launch_ros.substitutions': {'FindPackageShare': FindPackageShare},
}


def install(monkeypatch):
    """Put the stand-in modules in sys.modules for one test (launch_common is imported afresh)."""
    for name, members in MODULES.items():
        module = types.ModuleType(name)
        module.__dict__.update(members)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, 'diffseg_ros.launch_common', raising=False)


def run_launch(path, **arguments):
    """Return the actions the launch file at path starts with these launch arguments (defaults otherwise)."""
    spec = importlib.util.spec_from_file_location(f'launch_file_{abs(hash(str(path)))}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    context, actions = Context(), []
    for entity in module.generate_launch_description().args[0]:
        if isinstance(entity, DeclareLaunchArgument):
            name = entity.args[0]
            value = arguments.pop(name, None)
            context.launch_configurations[name] = (value if value is not None
                                                   else perform(entity.kwargs['default_value'], context))
        elif isinstance(entity, OpaqueFunction):
            actions += entity.kwargs['function'](context)
        else:
            actions.append(entity)
    assert not arguments, f'arguments the launch file does not declare: {sorted(arguments)}'
    return actions, context
