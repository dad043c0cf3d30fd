"""vmbox on Kubernetes: the Middlebox resource, the objects it owns, and the operator.

Pure (no client, no I/O, unit-tested without a cluster):
- crd.py        the `middleboxes.vmbox.dev` CRD, its OpenAPI v3 schema generated
                from the same pydantic models as the YAML spec (vmbox.spec)
- manifests.py  what one Middlebox owns: ConfigMap (the spec), Deployment of
                replica pods, Service, PodDisruptionBudget
- install.py    what the operator needs once per cluster: RBAC, its Deployment,
                the etcd StatefulSet
- reconcile.py  the level-based reconcile: (Middlebox, observed objects, pods,
                samples, now) -> objects to apply, patches, status, requeue
- pods.py       reading pods: crash loops, the order the ReplicaSet removes them in
- status.py     the status subresource and its conditions, as the CRD's schema has it

The API driver is vmbox.runtime.kubernetes, the only package that imports
the Kubernetes client library (an import-linter contract).
"""
