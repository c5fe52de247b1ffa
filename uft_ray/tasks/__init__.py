"""Tasks with exact verifiers for hint-guided RFT (DESIGN.md "Hint-guided RFT"; Liu et al., arXiv 2505.16984).

A task row is a dict with `row_id`, `prompt` (the text the policy continues), `hint` (the reference solution
as a list of chunks), `answer` (the hint joined plus the closing `</think>\\n<answer> ... </answer>`) and the
task's own fields. A verifier is a plain function `(row, text) -> reward`, where `text` is what follows the
prompt (the revealed hint plus the generated response): 1.0 correct, 0.1 an answer in the right format but
wrong, 0.0 no answer. Model output is never passed to `eval`. Which verifier a built-in task uses is
`rft.reward_rules`: `paper` (the authors' reward code, the default) or `strict` (each task module's `verify`).

- `countdown`: generated, verified exactly (uft_ray.tasks.arith);
- `knights_knaves`: generated with a unique solution, verified exactly;
- `math_answers`: MATH-lighteval rows, `\\boxed{}` answers compared after Hendrycks-style normalization;
- `rules`: the built-in tasks' verifiers by rule set; the `paper` rules (extraction after "Assistant:", the last
  line for Countdown and MATH, the authors' number check and normalization);
- `generic`: a user's task (`prompt`, `hint` or `solution`, `answer`) and verifiers named `module:function`;
- `hints`: the hint schedule, a pure function of (seed, step, row_id);
- `verify`: the answer extraction shared by the tasks and a verifier runner with a time limit.
"""
