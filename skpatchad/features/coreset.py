"""Greedy coreset subsampling (PatchCore, Algorithm 1), made fast without changing it.

The greedy minimax-facility-location coreset repeatedly adds the point farthest
from the points already selected. The textbook loop updates the distance of
*every* point to the selected set at each of the k iterations: O(N k d) work and
a full pass over memory per iteration, which is what makes PatchCore's fit slow.

On CPU we select exactly the same points but skip most of that work with the
triangle inequality. Every point x keeps its nearest selected center a(x) and
m(x) = d(x, a(x)); points are chained in one linked list per center, and each
center j keeps r_j, the largest m(x) among its points. When center c is added,
x can only get closer if d(x, c) < m(x), and d(x, c) >= d(a(x), c) - m(x), so

* a whole cluster j is skipped when d(j, c) >= 2 r_j, and
* inside a visited cluster, x is skipped when d(j, c) >= 2 m(x).

Clusters shrink as centers are added, so soon only a small neighbourhood of c
is touched. The farthest point of each cluster is kept too, so the next center
(the global argmax of m, lowest index on ties) is found from the k clusters
instead of all N points. Both the pruned and the plain loop use the same
distance kernel, so their selections are identical (tested). On CUDA the plain
loop runs in torch: one fused pass per iteration is fast there.
"""

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba comes with pynndescent
    numba = None

# Relative slack on the pruning tests so float rounding can never skip a point
# whose distance the plain loop would have lowered.
_SLACK = 1.0 + 1e-4


def projection_matrix(n_features, n_components, random_state):
    """(n_features, n_components) Johnson-Lindenstrauss Gaussian matrix, or None when it would not reduce."""
    if n_components is None or n_components >= n_features:
        return None
    rng = np.random.RandomState(random_state)
    matrix = rng.normal(0.0, 1.0 / np.sqrt(n_components), size=(n_features, n_components))
    return torch.from_numpy(matrix.astype(np.float32))


def random_projection(features, n_components, random_state):
    """Johnson-Lindenstrauss Gaussian projection of (N, D) torch features to n_components."""
    matrix = projection_matrix(features.shape[1], n_components, random_state)
    return features if matrix is None else features @ matrix.to(features.device)


if numba is not None:
    _jit = numba.njit(cache=True, nogil=True)

    @numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _distance(points, i, j):
        total = np.float32(0.0)
        for t in range(points.shape[1]):
            diff = points[i, t] - points[j, t]
            total += diff * diff
        return np.sqrt(total)

    @_jit
    def _plain_greedy(points, n_select, start):
        n_points = points.shape[0]
        min_dist = np.full(n_points, np.inf, dtype=np.float32)
        selected = np.empty(n_select, dtype=np.int64)
        current = start
        for step in range(n_select):
            selected[step] = current
            best, best_value = 0, np.float32(-1.0)
            for i in range(n_points):
                d = _distance(points, i, current)
                if d < min_dist[i]:
                    min_dist[i] = d
                if min_dist[i] > best_value:
                    best_value = min_dist[i]
                    best = i
            current = best
        return selected

    @_jit
    def _pruned_greedy(points, n_select, start):
        n_points = points.shape[0]
        min_dist = np.empty(n_points, dtype=np.float32)
        next_point = np.full(n_points, -1, dtype=np.int64)
        head = np.full(n_select, -1, dtype=np.int64)
        radius = np.zeros(n_select, dtype=np.float32)
        farthest = np.zeros(n_select, dtype=np.int64)
        selected = np.empty(n_select, dtype=np.int64)

        current = start
        selected[0] = current
        # every point joins the first cluster; build its list in index order
        for i in range(n_points - 1, -1, -1):
            min_dist[i] = _distance(points, i, current)
            next_point[i] = head[0]
            head[0] = i
        best, best_value = 0, np.float32(-1.0)
        for i in range(n_points):
            if min_dist[i] > best_value:
                best_value, best = min_dist[i], i
        radius[0], farthest[0] = best_value, best

        for step in range(1, n_select):
            # next center: farthest point overall, lowest index on ties
            current, current_value = -1, np.float32(-1.0)
            for j in range(step):
                if radius[j] > current_value or (radius[j] == current_value and farthest[j] < current):
                    current_value, current = radius[j], farthest[j]
            selected[step] = current
            new_radius, new_farthest = np.float32(-1.0), n_points
            for j in range(step):
                if radius[j] == 0.0:
                    continue
                to_center = _distance(points, selected[j], current)
                if to_center >= 2.0 * radius[j] * _SLACK:
                    continue
                # walk cluster j: keep the points that stay, move the others to `step`
                i = head[j]
                head[j] = -1
                kept_radius, kept_farthest = np.float32(0.0), n_points
                while i != -1:
                    following = next_point[i]
                    moved = False
                    if to_center < 2.0 * min_dist[i] * _SLACK:
                        d = _distance(points, i, current)
                        if d < min_dist[i]:
                            min_dist[i] = d
                            moved = True
                    if moved:
                        next_point[i] = head[step]
                        head[step] = i
                        if min_dist[i] > new_radius or (min_dist[i] == new_radius and i < new_farthest):
                            new_radius, new_farthest = min_dist[i], i
                    else:
                        next_point[i] = head[j]
                        head[j] = i
                        if min_dist[i] > kept_radius or (min_dist[i] == kept_radius and i < kept_farthest):
                            kept_radius, kept_farthest = min_dist[i], i
                    i = following
                radius[j] = kept_radius
                farthest[j] = kept_farthest if kept_farthest < n_points else selected[j]
            radius[step] = max(new_radius, np.float32(0.0))
            farthest[step] = new_farthest if new_farthest < n_points else current
        return selected


@torch.inference_mode()
def _torch_greedy(points, n_select, start):
    min_dist = torch.full((len(points),), float("inf"), device=points.device)
    selected = np.empty(n_select, dtype=np.int64)
    current = int(start)
    for step in range(n_select):
        selected[step] = current
        diff = points - points[current]
        torch.minimum(min_dist, (diff * diff).sum(1).sqrt(), out=min_dist)
        current = int(torch.argmax(min_dist))
    return selected


def greedy_coreset(points, n_select, start=0, method="auto"):
    """Indices of the greedy k-center coreset of ``points``, in selection order.

    Parameters
    ----------
    points : torch.Tensor or ndarray of shape (N, d)
        Usually a random projection of the patch features.
    n_select : int
        Number of points to keep (1 <= n_select <= N).
    start : int
        Index of the first selected point.
    method : {"auto", "pruned", "plain", "torch"}
        ``"auto"``: the pruned exact loop on CPU, the plain torch loop on CUDA.
        ``"plain"`` is the textbook loop with the same distance kernel as
        ``"pruned"`` (reference for tests).

    Returns
    -------
    indices : ndarray of int64, shape (n_select,)
    """
    n_points = len(points)
    if not 1 <= n_select <= n_points:
        raise ValueError("n_select must be in [1, %d], got %d" % (n_points, n_select))
    if not 0 <= start < n_points:
        raise ValueError("start must be in [0, %d), got %d" % (n_points, start))
    on_cuda = isinstance(points, torch.Tensor) and points.is_cuda
    if method == "auto":
        method = "torch" if on_cuda or numba is None else "pruned"
    if method == "torch":
        tensor = points if isinstance(points, torch.Tensor) else torch.from_numpy(np.asarray(points))
        return _torch_greedy(tensor.float().contiguous(), n_select, start)
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    points = np.ascontiguousarray(points, dtype=np.float32)
    if method == "pruned":
        return _pruned_greedy(points, int(n_select), int(start))
    if method == "plain":
        return _plain_greedy(points, int(n_select), int(start))
    raise ValueError("unknown coreset method %r" % (method,))
