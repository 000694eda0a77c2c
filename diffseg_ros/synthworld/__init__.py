"""SynthWorld: ROS-free procedural household scenes (RGB, depth, K, pose, instances, captions)."""
from .captions import parse_caption
from .objects import CATEGORIES
from .render import Frame, render
from .scene import (STUFF, CameraRig, ObjectInfo, Scene, SceneSpec, camera_orbit, describe, generate_batch,
                    generate_scene, rig_pose, sample_spec, visible_objects)
from .textures import COLOURS, PATTERNS

__all__ = ['CATEGORIES', 'COLOURS', 'PATTERNS', 'STUFF', 'CameraRig', 'Frame', 'ObjectInfo', 'Scene',
           'SceneSpec', 'camera_orbit', 'describe', 'generate_batch', 'generate_scene', 'parse_caption',
           'render', 'rig_pose', 'sample_spec', 'visible_objects']
