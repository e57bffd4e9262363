"""Rotation-6d helpers (numpy, vectorised over leading dims) for absolute robomimic actions.

Convention — the one diffusion_policy uses: its `RotationTransformer("axis_angle", "rotation_6d")` calls pytorch3d's
`matrix_to_rotation_6d` / `rotation_6d_to_matrix`, and pytorch3d keeps the first two **rows** of the rotation matrix
(`matrix[..., :2, :]`, "by dropping the last row"), not the first two columns as in Zhou et al.'s paper. Its inverse
Gram-Schmidt-orthonormalises the two 3-vectors and stacks them, with their cross product, as rows. So here, for a
rotation matrix R acting on column vectors (scipy's and robosuite's convention), rot6d = (R[0, :], R[1, :]); vectors
written with these functions match what diffusion_policy stores for abs-action robomimic data, and vice versa.

Axis-angle (rotation vector: unit axis times angle in radians) <-> matrix goes through
`scipy.spatial.transform.Rotation`; only the 6d part is written here.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

_EPS = 1e-12


def matrix_to_rot6d(matrix: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 6): the first two rows, concatenated (pytorch3d's layout)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices must have shape (..., 3, 3), got {matrix.shape}")
    return matrix[..., :2, :].reshape(*matrix.shape[:-2], 6).copy()


def rot6d_to_matrix(rot6d: np.ndarray) -> np.ndarray:
    """(..., 6) -> (..., 3, 3) rotation matrices by Gram-Schmidt (rows b1, b2, b1 x b2), as pytorch3d does.

    Any two non-parallel 3-vectors are accepted (a policy's output need not be orthonormal); a zero or (numerically)
    parallel pair has no rotation and raises ValueError.
    """
    rot6d = np.asarray(rot6d, dtype=np.float64)
    if rot6d.shape[-1:] != (6,):
        raise ValueError(f"rotation-6d vectors must have shape (..., 6), got {rot6d.shape}")
    a1, a2 = rot6d[..., :3], rot6d[..., 3:]
    n1 = np.linalg.norm(a1, axis=-1, keepdims=True)
    if np.any(n1 < _EPS):
        raise ValueError("rotation-6d: the first 3-vector is zero, so it defines no rotation")
    b1 = a1 / n1
    b2 = a2 - np.sum(b1 * a2, axis=-1, keepdims=True) * b1
    n2 = np.linalg.norm(b2, axis=-1, keepdims=True)
    if np.any(n2 < 1e-9 * np.maximum(np.linalg.norm(a2, axis=-1, keepdims=True), 1.0)):
        raise ValueError("rotation-6d: the two 3-vectors are zero or parallel, so they define no rotation")
    b2 = b2 / n2
    b3 = np.cross(b1, b2)
    return np.stack((b1, b2, b3), axis=-2)


def axis_angle_to_rot6d(axis_angle: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vectors -> (..., 6) rotation-6d."""
    axis_angle = np.asarray(axis_angle, dtype=np.float64)
    if axis_angle.shape[-1:] != (3,):
        raise ValueError(f"axis-angle vectors must have shape (..., 3), got {axis_angle.shape}")
    lead = axis_angle.shape[:-1]
    matrix = Rotation.from_rotvec(axis_angle.reshape(-1, 3)).as_matrix()
    return matrix_to_rot6d(matrix).reshape(*lead, 6)


def rot6d_to_axis_angle(rot6d: np.ndarray) -> np.ndarray:
    """(..., 6) rotation-6d -> (..., 3) rotation vectors (angle in [0, pi])."""
    matrix = rot6d_to_matrix(rot6d)
    lead = matrix.shape[:-2]
    return Rotation.from_matrix(matrix.reshape(-1, 3, 3)).as_rotvec().reshape(*lead, 3)
