"""A Jepsen-style soak of the driver: three test nodes behind fault proxies,
client processes recording every call, a seeded fault schedule, and checkers
for lost, duplicated and phantom writes, hangs, untyped errors, recovery,
leaks and availability. Run it with ``scripts/soak.sh``; see docs/reliability.md.

Modules, one idea each:

- :mod:`.history`: the JSON-lines records of calls, faults and client summaries.
- :mod:`.workload`: one client process (``python -m tests.soak.workload``).
- :mod:`.faults`: the seeded fault schedule (pure: no trio, no processes).
- :mod:`.nemesis`: applies and heals the schedule's faults on the running cluster.
- :mod:`.checker`: the checks over the histories and the final database state.
- :mod:`.timeline`: a self-contained HTML/SVG picture of a run.
- :mod:`.processes`: the node, proxy and client processes of a run.
- :mod:`.runner`: the whole run and its report (``python -m tests.soak``).
"""
