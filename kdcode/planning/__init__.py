"""Students chosen by a latency budget on the user's own machine (`kdcode plan`, `kdcode distil --latency-ms`).

- :mod:`~kdcode.planning.shapes`: a candidate shape (depth, MLP width, heads, runtime precision) and the model of
  that shape, built with random weights to be timed or from the teacher's measured blocks to be scored;
- :mod:`~kdcode.planning.timing`: the task (a completion of a stated prompt length and new tokens) timed through
  kdcode's own decoding, in interleaved rounds;
- :mod:`~kdcode.planning.search`: the search over shapes, the quality proxy of the finalists, the choice, and the
  one-line outcomes (no candidate fits, the teacher itself fits, a family that cannot be pruned).
"""
