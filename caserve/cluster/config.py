"""The cluster YAML: what to deploy on Ray and how to scale it.

::

    model: caserve/tiny-gpt2
    gpu_servers: null            # null: one per GPU in the Ray cluster
    native_workers_per_gpu_server: 1
    assisted:
      min: 1
      max: 16
      target_queue_delay_s: 0.5
    router:  {port: 8000, policy: fcfs, max_batch: 8, max_queue: 256}
                                 # optional: worker_token_file, api_key_file (read where `cluster up` runs)
    gpu_server: {base_port: 7070, device: auto, token_file: /etc/caserve/token}
    network: {mode: cluster}     # cluster: bind node IPs (token required); loopback: one host only
    resources:
      gpu_node: null             # optional custom resource a GPU server also requests
      cpu_node: caserve_cpu      # custom resource (1 per worker) that CPU-only nodes advertise
      gpu_node_labels: {}        # and/or Ray node labels (ray start --labels), as label selectors
      cpu_node_labels: {}

Every field has a default; unknown fields are refused (a typo must not silently fall back to one).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from caserve.cluster.errors import ConfigError
from caserve.serving.credentials import CredentialError, new_token, read_secret_file
from caserve.defaults import DEFAULT_MODEL
from caserve.units import parse_size

logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AssistedConfig(_Strict):
    """Autoscaled CPU-assisted workers on CPU nodes."""

    min: int = Field(1, ge=0)
    max: int = Field(8, ge=0)
    target_queue_delay_s: float = Field(0.5, gt=0, description="scale up when the queue delay exceeds this")
    scale_down_below: float = Field(0.25, gt=0, lt=1, description="fraction of the target under which to shrink")
    scale_up_cooldown_s: float = Field(5.0, ge=0, description="least time between scale-ups (workers load slowly)")
    scale_down_after_s: float = Field(30.0, ge=0, description="quiet time (low delay, empty queue) before a scale-down")
    drain_timeout_s: float = Field(300.0, gt=0, description="longest wait for a draining worker's running batch")
    placement_timeout_s: float = Field(120.0, gt=0, description="a new worker Ray has not placed by then is given up")
    cpus_per_worker: float = Field(1.0, gt=0)
    threads: int = Field(1, ge=1, description="torch threads per assisted worker")

    @model_validator(mode="after")
    def _order(self) -> "AssistedConfig":
        if self.min > self.max:
            raise ValueError(f"assisted.min ({self.min}) > assisted.max ({self.max})")
        return self


class TLSConfig(_Strict):
    """A link's TLS: the listener's certificate and key (PEM, at the same path on every node that runs
    it), and the CA its clients check it against (default: the certificate itself, right for a
    self-signed one). Empty: plain TCP."""

    cert: Optional[Path] = Field(None, description="certificate (PEM) the listener presents")
    key: Optional[Path] = Field(None, description="the certificate's private key (PEM)")
    ca: Optional[Path] = Field(None, description="CA file clients check the certificate against (default: cert)")

    @model_validator(mode="after")
    def _pairs(self) -> "TLSConfig":
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls needs both cert and key, or neither")
        if self.ca is not None and self.cert is None:
            raise ValueError("tls.ca checks a certificate: it needs tls.cert and tls.key")
        return self

    @property
    def on(self) -> bool:
        return self.cert is not None

    @property
    def client_ca(self) -> Optional[Path]:
        return self.ca or self.cert


class RouterConfig(_Strict):
    port: int = Field(8000, ge=1, le=65535)
    policy: Literal["fcfs", "ect"] = "fcfs"
    max_batch: int = Field(8, ge=1)
    max_queue: int = Field(256, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    resource: Optional[str] = Field(None, description="custom resource the router requests 0.001 of (pins it, e.g. to the head)")
    worker_token_file: Optional[Path] = Field(
        None, description="the router's worker token (for workers outside the cluster too); default: generated")
    api_key_file: Optional[Path] = Field(None, description="API key the public routes require; default: none")
    tls: TLSConfig = Field(default_factory=TLSConfig, description="HTTPS on the router's port")


class GPUServerConfig(_Strict):
    base_port: int = Field(7070, ge=1, le=65535, description="GPU server i listens on base_port + i")
    device: str = "auto"
    token_file: Optional[Path] = Field(None, description="same path on every node; required in cluster mode")
    tenant_memory_limit: str = "0"
    num_cpus: float = Field(1.0, ge=0)
    threads: int = Field(0, ge=0, description="torch intra-op threads of the server (0: torch's default)")
    tls: TLSConfig = Field(default_factory=TLSConfig, description="TLS on the GPU servers' TCP port")

    @field_validator("tenant_memory_limit")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)  # raises ValueError on "8 gigs"; checked here, not on every GPU node
        return value


class NetworkConfig(_Strict):
    """``cluster``: the router binds 0.0.0.0, GPU servers bind their node's IP and require the token.
    ``loopback``: everything binds 127.0.0.1 (a one-host Ray cluster, tests)."""

    mode: Literal["cluster", "loopback"] = "cluster"


class ResourcesConfig(_Strict):
    gpu_node: Optional[str] = Field(None, description="custom resource a GPU server requests 0.001 of, besides 1 GPU")
    cpu_node: Optional[str] = Field("caserve_cpu", description="custom resource each assisted worker requests 1 of")
    native_num_cpus: float = Field(1.0, ge=0)
    gpu_node_labels: dict[str, str] = Field(default_factory=dict, description="Ray label selector of GPU servers")
    cpu_node_labels: dict[str, str] = Field(default_factory=dict, description="Ray label selector of assisted workers")


class ClusterConfig(_Strict):
    name: str = Field("caserve", pattern=r"^[a-z0-9][a-z0-9-]{0,40}$", description="Ray namespace and actor prefix")
    model: str = DEFAULT_MODEL
    shrink: bool = False
    task: Optional[str] = None
    gpu_servers: Optional[int] = Field(None, ge=0, description="null: one per GPU in the Ray cluster")
    native_workers_per_gpu_server: int = Field(1, ge=0)
    assisted: AssistedConfig = AssistedConfig()
    router: RouterConfig = RouterConfig()
    gpu_server: GPUServerConfig = GPUServerConfig()
    network: NetworkConfig = NetworkConfig()
    resources: ResourcesConfig = ResourcesConfig()
    control_interval_s: float = Field(1.0, gt=0, description="controller loop period")
    ready_timeout_s: float = Field(600.0, gt=0, description="`cluster up` waits this long for the minimum layout")
    worker_step_delay_s: float = Field(0.0, ge=0, description="testing only: sleep per decode step in workers")
    # The router's secrets, resolved once where `cluster up` runs (:meth:`with_secrets`) and handed to
    # every actor inside this config (Ray pickles private attributes), never written to YAML or argv.
    _worker_token: Optional[str] = PrivateAttr(None)
    _api_key: Optional[str] = PrivateAttr(None)

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterConfig":
        if self.network.mode == "cluster" and self.gpu_server.token_file is None:
            raise ValueError("network.mode=cluster needs gpu_server.token_file: a GPU server without a token "
                             "accepts loopback clients only")
        return self

    @property
    def loopback(self) -> bool:
        return self.network.mode == "loopback"

    @property
    def worker_token(self) -> Optional[str]:
        return self._worker_token

    @property
    def api_key(self) -> Optional[str]:
        return self._api_key

    def with_secrets(self) -> "ClusterConfig":
        """A copy holding the router's worker token (read from ``router.worker_token_file``, else fresh)
        and API key (from ``router.api_key_file``, if any)."""
        out = self.model_copy()
        try:
            r = self.router
            out._worker_token = read_secret_file(r.worker_token_file, "worker token") if r.worker_token_file \
                else new_token()
            out._api_key = read_secret_file(r.api_key_file, "API key") if r.api_key_file else None
        except CredentialError as exc:
            raise ConfigError(str(exc)) from None
        return out


def parse_config(data: object) -> ClusterConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the cluster config must be a mapping, not {type(data).__name__}")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid cluster config:\n{exc}") from None


def load_config(path: Path) -> ClusterConfig:
    """Read and validate a cluster YAML file (``ConfigError`` names the bad field)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    cfg = parse_config(data)
    logger.debug("loaded cluster config %s", path)
    return cfg
