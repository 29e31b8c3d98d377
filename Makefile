# Conveyor developer targets. The test suite itself runs with `scripts/test` (no Docker needed);
# the kind targets are for users who have Docker and are not exercised by this project's CI.
KIND_CLUSTER ?= conveyor
OPERATOR_IMAGE ?= conveyor-operator:dev
WORKER_IMAGE ?= conveyor-worker:dev

.PHONY: test demo images kind-up kind-load kind-install kind-down

test:
	scripts/test

demo:
	scripts/conveyor demo

images:
	docker build -f Dockerfile.operator -t $(OPERATOR_IMAGE) .
	docker build -f Dockerfile.worker -t $(WORKER_IMAGE) .

kind-up:
	kind create cluster --config deploy/kind/cluster.yaml --name $(KIND_CLUSTER)

kind-load: images
	kind load docker-image $(OPERATOR_IMAGE) $(WORKER_IMAGE) --name $(KIND_CLUSTER)

kind-install: kind-load
	helm upgrade --install conveyor charts/conveyor --namespace conveyor-system --create-namespace \
	  --set operator.image.repository=$(firstword $(subst :, ,$(OPERATOR_IMAGE))) \
	  --set operator.image.tag=$(lastword $(subst :, ,$(OPERATOR_IMAGE))) \
	  --set operator.image.pullPolicy=Never --set redis.enabled=true

kind-down:
	kind delete cluster --name $(KIND_CLUSTER)
