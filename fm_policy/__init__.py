"""fm-policy: flow-matching action-chunk policies for robot imitation learning.

Data flows dataset -> sampler -> policy -> trainer -> checkpoint -> harness/server; the subpackages
`fm_policy.datasets`, `fm_policy.envs` and `fm_policy.eval` live in the repository's top-level folders.
"""

__version__ = "0.1.0"
