"""A fuzz campaign over every image format reader.

Seeds (``seeds``): small valid images of every format read here, made by our own writers (and by
qemu-img where it writes a format we only read), with their structural regions (headers,
tables, descriptors) listed. Mutators (``mutate``): seeded and reproducible (a case is a pure
function of the seeds, the campaign seed and the case number), biased to those regions. Oracle
(``oracle``): open the mutant by probing, ``info``, the extents, ``check``, bounded reads; the
only acceptable ends are a result or a typed error (``HyperSDKError``). Runner (``campaign``,
``worker``): cases run in child processes under ``RLIMIT_AS`` with a per-case timeout, so a
hang or a runaway allocation is a finding, not a dead test run.

In the suite: tests/test_fuzz_formats.py. On demand: ``python -m tests.fuzz --help``.
"""
