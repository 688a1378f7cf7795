"""Scale-out on engines people already run: dataset tokenization on Ray Data (``ray_jobs``), serving on
Triton Inference Server through PyTriton (``serve``) and Triton model repositories (``triton_repo``)."""
