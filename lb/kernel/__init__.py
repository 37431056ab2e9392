"""The kernel layer: every bpf() call, attachment and namespace switch of the project.

One module per concern; loaders, labs and benchmarks import from here and keep no copy.

* :mod:`lb.kernel.syscall` -- ``bpf_syscall``, the bpf() command numbers, ``KernelError``;
* :mod:`lb.kernel.bpf_attr` -- the ctypes members of ``union bpf_attr`` and info structs;
* :mod:`lb.kernel.cpus` -- ``possible_cpus`` (the length of per-CPU values);
* :mod:`lb.kernel.maps` -- map create/open/info and element and batch operations;
* :mod:`lb.kernel.objects` -- pinning in bpffs and opening pins;
* :mod:`lb.kernel.progs` -- loading raw instructions, prog info, prog fd by id, map ids;
* :mod:`lb.kernel.testrun` -- BPF_PROG_TEST_RUN, ordinary and live-frames mode;
* :mod:`lb.kernel.xdp` -- XDP attach/detach and the XDP_FLAGS_* (defined once);
* :mod:`lb.kernel.tc` -- tc clsact ingress attach/detach (cls_bpf, direct action);
* :mod:`lb.kernel.netns` -- entering a network namespace (this thread, a block, a call).
"""
