"""Tests of the pinhole geometry helpers with hand-computed points."""
import numpy as np
import pytest

from diffseg_ros.core.geometry import (depth_to_points, intrinsics, invert_pose, pixel_rays, points_to_world,
                                       project_points, rasterize_labels, world_to_camera)

# fx = fy = 10, principal point (2, 1.5) on a 5x4 image: pixel (col c, row r) centre is (u=c, v=r).
K = np.array([[10.0, 0.0, 2.0], [0.0, 10.0, 1.5], [0.0, 0.0, 1.0]])
W, H = 5, 4


def test_intrinsics_centre_and_fov():
    k = intrinsics(128, 96, 90.0)
    assert k[0, 0] == pytest.approx(64.0)
    assert (k[0, 2], k[1, 2]) == (63.5, 47.5)


def test_pixel_rays_have_unit_z_and_pass_through_pixel_centres():
    rays = pixel_rays(K, W, H)
    assert rays.shape == (H, W, 3)
    assert np.all(rays[..., 2] == 1)
    assert rays[1, 3, 0] == pytest.approx((3 - 2.0) / 10)
    assert rays[1, 3, 1] == pytest.approx((1 - 1.5) / 10)


def test_depth_to_points_hand_computed_and_invalid_depth():
    depth = np.full((H, W), 2.0)
    depth[0, 0], depth[0, 1], depth[0, 2] = np.nan, np.inf, 0.0
    points = depth_to_points(depth, K)
    assert points.shape == (H, W, 3)
    np.testing.assert_allclose(points[3, 4], [(4 - 2) * 2 / 10, (3 - 1.5) * 2 / 10, 2.0])
    assert np.isnan(points[0, :3]).all()
    assert depth_to_points(depth, K, organized=False).shape == (H * W, 3)


def test_depth_points_projection_round_trip():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.3, 5.0, (H, W))
    proj = project_points(depth_to_points(depth, K), K, W, H)
    assert len(proj.index) == H * W
    rows, cols = np.divmod(proj.index, W)
    np.testing.assert_array_equal(proj.pixels, np.stack([cols, rows], 1))
    np.testing.assert_allclose(proj.uv, np.stack([cols, rows], 1), atol=1e-9)
    np.testing.assert_allclose(proj.depth, depth.reshape(-1)[proj.index])


def test_world_round_trip():
    angle = 0.7
    pose = np.eye(4)
    pose[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    pose[:3, 3] = [1.0, -2.0, 0.5]
    points = np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 3.0]])
    world = points_to_world(points, pose)
    np.testing.assert_allclose(world[0], [1.0, -2.0, 1.5])
    np.testing.assert_allclose(world_to_camera(world, pose), points, atol=1e-12)
    np.testing.assert_allclose(invert_pose(pose) @ pose, np.eye(4), atol=1e-12)
    assert np.isnan(points_to_world(np.array([[np.nan, 0, 1]]), pose)).all()


def test_project_points_drops_behind_outside_and_non_finite():
    points = np.array([
        [0.0, 0.0, 1.0],        # centre -> u=2, v=1.5 -> pixel (2, 2) (v rounds half up)
        [0.0, 0.0, -1.0],       # behind the camera
        [0.0, 0.0, 0.0],        # on the camera plane
        [1.0, 0.0, 1.0],        # u = 12: right of the image
        [-0.24, 0.0, 1.0],      # u = -0.4 -> pixel column 0, kept
        [-0.26, 0.0, 1.0],      # u = -0.6 -> column -1, dropped
        [np.nan, 0.0, 1.0],
        [0.0, np.inf, 1.0],
        [0.1, -0.1, 2.0],       # u = 2.5 -> column 3 (halves round up), v = 1.0 -> row 1
    ])
    proj = project_points(points, K, W, H)
    np.testing.assert_array_equal(proj.index, [0, 4, 8])
    np.testing.assert_array_equal(proj.pixels, [[2, 2], [0, 2], [3, 1]])
    np.testing.assert_allclose(proj.depth, [1.0, 1.0, 2.0])
    np.testing.assert_allclose(proj.uv[2], [2.5, 1.0])


def test_rasterize_labels_nearest_wins_and_skips_invalid():
    points = np.array([
        [0.0, 0.0, 3.0],        # pixel (2, 2) far
        [0.0, 0.0, 1.0],        # pixel (2, 2) near: wins although listed later
        [0.1, 0.0, 1.0],        # pixel (3, 2) tie at depth 1 ...
        [0.1, 0.0, 1.0],        # ... with this one: the first listed wins
        [0.0, 0.0, -1.0],       # behind
        [np.nan, 0.0, 1.0],     # invalid
        [0.0, np.inf, 1.0],     # invalid
        [5.0, 0.0, 1.0],        # outside
    ])
    labels = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    image, depth = rasterize_labels(points, labels, K, W, H, return_depth=True)
    expected = np.zeros((H, W), np.int32)
    expected[2, 2], expected[2, 3] = 2, 3
    np.testing.assert_array_equal(image, expected)
    assert image.dtype == np.int32
    assert depth[2, 2] == 1.0 and depth[2, 3] == 1.0 and np.isinf(depth[0, 0])
    # Same result whatever the input order (apart from exact ties).
    order = [7, 6, 5, 4, 1, 0, 2, 3]
    np.testing.assert_array_equal(rasterize_labels(points[order], labels[order], K, W, H), expected)


def test_rasterize_labels_empty_input():
    image = rasterize_labels(np.zeros((0, 3)), np.zeros(0, int), K, W, H)
    assert image.shape == (H, W) and not image.any()
