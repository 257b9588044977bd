"""The model server, and the shared lower layer of the project.

``serving`` imports no other package of ours; ``loadtests``, ``models`` and ``gateway`` may all import it
(tests/test_layers.py checks the layers). Besides the model server itself, it holds what several of them need:
the model repository's layout and its default location (:mod:`serving.repository`), the V2 protocol and body
limits the gateway shares (:mod:`serving.protocol`, :mod:`serving.limits`), the machine description every
report carries (:mod:`serving.machine`), the one helper that starts, waits for, stops and measures child processes
(:mod:`serving.process`), and the rule by which two answers agree (:mod:`serving.agreement`).
"""
