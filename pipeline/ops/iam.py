"""Least privilege, checked from needs: the API calls each identity really makes, evaluated
against the grants ``templates/terraform`` declares for it.

- **Needs.** The local stack's proxies record every call under the identity that made it
  (``pipeline/local/audit.py``); :func:`needs_of` maps each call to the IAM permission it needs
  on the resource it touches (an object, a bucket, a table, a dataset, a subscription, a topic,
  a project), as GCP's access-control tables say: overwriting an object needs
  ``storage.objects.delete`` besides ``create``; a load job needs ``bigquery.jobs.create`` on
  the project; listing objects is checked against the bucket, not a prefix.
- **Grants.** :func:`terraform_grants` parses the HCL, resolves names, and keeps each binding
  of an identity we run as (the worker and launcher, the rollback rule, the model operators):
  role, scope, and an IAM condition on ``resource.name`` prefixes.
- **Verdict.** :func:`evaluate`: a need no grant allows is denied (the first launch would fail
  there); a grant no need uses is reported, and so is a condition that restricts nothing
  because another grant allows the same on a wider scope.

Local names equal production's (the stack uses the Terraform's), except that tests use datasets,
topics and subscriptions of their own: each is read as the one the Terraform declares.
``templates/iam/needs.json`` keeps the needs of the last full recorded run (``make iam``), so
``templates/deploy.sh preflight`` can check the grants offline.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "templates" / "terraform"
NEEDS_FILE = ROOT / "templates" / "iam" / "needs.json"
LOCAL_PROJECT = "tilestream-local"

# Who we run as, and how the Terraform names each: a service account resource, or a variable
# listing members. Everyone else (the tests' harness, an operator's own login) is not evaluated.
IDENTITIES = {
    "worker": "google_service_account.worker",  # Dataflow workers and the template launcher
    "rollback-rule": "google_service_account.rollback",  # the scheduled rollback job
    "model-operator": "var.model_operators",  # who publishes and promotes models
    "map": "google_service_account.map",  # the map's Cloud Run service (tilestream map)
}

# The permissions of the predefined roles the Terraform grants, for the services the stream
# calls (gcloud iam roles describe, 2026; docs/deploy.md says where they come from).
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "roles/dataflow.worker": frozenset({
        "storage.buckets.get", "storage.objects.create", "storage.objects.get",
        "dataflow.jobs.get", "dataflow.shuffle.read", "dataflow.shuffle.write",
        "dataflow.streamingWorkItems.commitWork", "dataflow.streamingWorkItems.getData",
        "dataflow.streamingWorkItems.getWork", "dataflow.workItems.lease",
        "dataflow.workItems.sendMessage", "dataflow.workItems.update",
        "logging.logEntries.create", "monitoring.timeSeries.create"}),
    "roles/storage.objectViewer": frozenset({"storage.objects.get", "storage.objects.list"}),
    "roles/storage.objectCreator": frozenset({"storage.objects.create"}),
    "roles/storage.objectUser": frozenset({
        "storage.objects.create", "storage.objects.delete", "storage.objects.get",
        "storage.objects.list", "storage.objects.update", "storage.objects.restore"}),
    "roles/storage.objectAdmin": frozenset({
        "storage.objects.create", "storage.objects.delete", "storage.objects.get",
        "storage.objects.list", "storage.objects.update", "storage.objects.restore",
        "storage.objects.getIamPolicy", "storage.objects.setIamPolicy"}),
    "roles/bigquery.dataEditor": frozenset({
        "bigquery.datasets.get", "bigquery.tables.create", "bigquery.tables.delete",
        "bigquery.tables.get", "bigquery.tables.getData", "bigquery.tables.list",
        "bigquery.tables.update", "bigquery.tables.updateData"}),
    "roles/bigquery.dataViewer": frozenset({
        "bigquery.datasets.get", "bigquery.tables.get", "bigquery.tables.getData",
        "bigquery.tables.list"}),
    "roles/bigquery.jobUser": frozenset({"bigquery.jobs.create"}),
    "roles/pubsub.subscriber": frozenset({"pubsub.subscriptions.consume",
                                          "pubsub.topics.attachSubscription"}),
    "roles/pubsub.viewer": frozenset({"pubsub.subscriptions.get", "pubsub.topics.get",
                                      "pubsub.subscriptions.list", "pubsub.topics.list"}),
    "roles/pubsub.publisher": frozenset({"pubsub.topics.publish"}),
    "roles/artifactregistry.reader": frozenset({"artifactregistry.repositories.downloadArtifacts"}),
    "roles/run.invoker": frozenset({"run.jobs.run", "run.routes.invoke"}),
}


# --- the Terraform ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grant:
    """One binding: an identity holds a role on a scope, maybe under a condition."""

    address: str  # the Terraform resource, e.g. google_storage_bucket_iam_member.worker_x
    identity: str
    role: str
    scope: str  # IAM resource name: projects/P, projects/_/buckets/B, projects/P/datasets/D...
    # IAM condition on resource.name: alternatives ("startsWith" | "==", value); () = none
    condition: tuple[tuple[str, str], ...] = ()
    custom: frozenset[str] = frozenset()  # a custom role's permissions, as the HCL lists them

    @property
    def permissions(self) -> frozenset[str]:
        return ROLE_PERMISSIONS.get(self.role, self.custom)

    def allows(self, permission: str, resource: str) -> bool:
        if permission not in self.permissions:
            return False
        # A project-level grant holds for everything in the project, its buckets included
        # (which IAM names projects/_/buckets/...).
        in_project = re.fullmatch(r"projects/[^/]+", self.scope) and (
            resource.startswith("projects/_/") or resource.startswith(self.scope + "/"))
        if not (in_project or resource == self.scope or resource.startswith(self.scope + "/")):
            return False
        return not self.condition or any(
            resource.startswith(value) if op == "startsWith" else resource == value
            for op, value in self.condition)


class TerraformError(ValueError):
    """The HCL cannot be read or a reference does not resolve."""


# The references inside an expression: variables, locals, data sources, resources' attributes.
_REFERENCE = re.compile(r"\b(?:var|local)\.\w+|\bdata\.\w+\.\w+\.\w+|\bgoogle_\w+\.\w+\.\w+")


def _blocks(parsed: dict, kind: str) -> Iterable[tuple[str, str, dict]]:
    for entry in parsed.get(kind, []):
        for rtype, named in entry.items():
            for name, body in named.items():
                yield rtype.strip('"'), name.strip('"'), body


def unquoted(value: Any) -> Any:
    """A declaration as HCL means it: python-hcl2 keeps HCL's quotes on strings (and on some
    keys) and marks blocks with ``__is_block__``; references (``${...}``) stay as written."""
    if isinstance(value, dict):
        return {unquoted(k): unquoted(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [unquoted(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value, strict=False)  # a string may span lines
        except ValueError:
            return value  # an expression between quoted operands: "a" == "b"
    return value


class Terraform:
    """The declarations of a Terraform directory, with ``${...}`` resolved on demand."""

    def __init__(self, directory: Path = TERRAFORM, variables: dict[str, Any] | None = None):
        import hcl2

        self.resources: dict[str, dict] = {}
        self.data: dict[str, dict] = {}
        self.variables: dict[str, Any] = {}
        self.locals: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        for path in sorted(directory.glob("*.tf")):
            with open(path) as handle:
                parsed = hcl2.load(handle)
            for rtype, name, body in _blocks(parsed, "resource"):
                self.resources[f"{rtype}.{name}"] = body
            for rtype, name, body in _blocks(parsed, "data"):
                self.data[f"data.{rtype}.{name}"] = body
            for entry in parsed.get("variable", []):
                for name, body in entry.items():
                    self.variables[name.strip('"')] = body.get("default")
            for entry in parsed.get("locals", []):
                self.locals.update({k: v for k, v in entry.items() if not k.startswith("__")})
            for entry in parsed.get("output", []):
                for name, body in entry.items():
                    self.outputs[name.strip('"')] = body.get("value")
        self.values = {k: self._literal(v) for k, v in self.variables.items()}
        self.values.update(variables or {})

    # values ---------------------------------------------------------------------------------

    def _literal(self, value: Any) -> Any:
        return unquoted(value)

    def value(self, raw: Any) -> Any:
        """A declared value with every ``${...}`` resolved."""
        if isinstance(raw, list):
            return [self.value(v) for v in raw]
        if not isinstance(raw, str):
            return raw
        if re.fullmatch(r"\$\{[^{}]+\}", raw):  # a bare reference keeps its type
            return self.reference(raw[2:-1])
        text = self._literal(raw) if raw.startswith('"') else raw
        return re.sub(r"\$\{([^{}]+)\}", lambda m: str(self.reference(m.group(1))), text)

    def reference(self, expression: str) -> Any:
        """``var.x``, ``local.x``, ``TYPE.NAME.ATTR``, ``data.TYPE.NAME.ATTR``, or a
        ``trimsuffix(x, "/")`` of one."""
        expression = expression.strip()
        wrapped = re.fullmatch(r"toset\((.+)\)", expression)
        if wrapped:
            return self.reference(wrapped.group(1))
        trim = re.fullmatch(r'trimsuffix\((.+),\s*"([^"]*)"\)', expression)
        if trim:
            return str(self.reference(trim.group(1))).removesuffix(trim.group(2))
        parts = expression.split(".")
        if parts[0] == "var" and len(parts) == 2:
            if parts[1] not in self.variables:
                raise TerraformError(f"undeclared variable {expression}")
            return self.values.get(parts[1])
        if parts[0] == "local" and len(parts) == 2:
            if parts[1] not in self.locals:
                raise TerraformError(f"undeclared local {expression}")
            return self.value(self.locals[parts[1]])
        if parts[0] == "each":
            return "${" + expression + "}"
        if parts[0] == "path":
            return str(TERRAFORM)
        if parts[0] == "data" and len(parts) == 4:
            if ".".join(parts[:3]) not in self.data:
                raise TerraformError(f"undeclared data source {expression}")
            return f"DATA_{parts[2].upper()}_{parts[3].upper()}"
        if len(parts) == 3:
            return self.attribute(f"{parts[0]}.{parts[1]}", parts[2])
        if len(parts) == 2 and f"{parts[0]}.{parts[1]}" in self.resources:
            return f"{parts[0]}.{parts[1]}"
        raise TerraformError(f"cannot resolve {expression}")

    def attribute(self, address: str, attribute: str) -> str:
        if address not in self.resources:
            raise TerraformError(f"undeclared resource {address}")
        body = self.resources[address]
        rtype = address.split(".")[0]
        project = self.values.get("project")
        name = self.value(body.get("name")) if "name" in body else None
        if rtype == "google_service_account" and attribute == "email":
            return f"{self.value(body['account_id'])}@{project}.iam.gserviceaccount.com"
        if rtype == "google_pubsub_topic" and attribute == "id":
            return f"projects/{project}/topics/{name}"
        if rtype == "google_pubsub_subscription" and attribute == "id":
            return f"projects/{project}/subscriptions/{name}"
        if rtype == "google_project_iam_custom_role" and attribute == "id":
            return f"projects/{project}/roles/{self.value(body['role_id'])}"
        if rtype == "google_artifact_registry_repository" and attribute == "name":
            return str(self.value(body["repository_id"]))
        if attribute in body:
            return str(self.value(body[attribute]))
        if attribute in ("id", "name") and name is not None:
            return str(name)
        return f"{address}.{attribute}"

    def unresolved(self) -> list[str]:
        """Every reference in the declarations that does not resolve (empty: all do)."""
        problems = []

        def walk(where: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    if not key.startswith("__"):
                        walk(where, inner)
            elif isinstance(value, list):
                for inner in value:
                    walk(where, inner)
            elif isinstance(value, str):
                for expression in re.findall(r"(?<!\$)\$\{([^{}]+)\}", value):
                    for token in _REFERENCE.findall(expression):
                        try:
                            self.reference(token)
                        except TerraformError as exc:
                            problems.append(f"{where}: {exc}")

        for address, body in self.resources.items():
            walk(address, body)
        for name, value in self.locals.items():
            walk(f"local.{name}", value)
        for name, value in self.outputs.items():
            walk(f"output.{name}", value)
        return problems


def _member_identity(tf: Terraform, body: dict) -> str | None:
    member = body.get("member", "")
    if "each.value" in member and "var.model_operators" in json.dumps(body.get("for_each", "")):
        return "model-operator"
    resolved = str(tf.value(member))
    for identity, declared in IDENTITIES.items():
        if declared.startswith("google_service_account.") and declared in tf.resources:
            if resolved == f"serviceAccount:{tf.attribute(declared, 'email')}":
                return identity
    return None


SCOPES = {  # binding resource -> (attribute naming its scope, IAM resource name format)
    "google_project_iam_member": ("project", "projects/{}"),
    "google_storage_bucket_iam_member": ("bucket", "projects/_/buckets/{}"),
    "google_bigquery_dataset_iam_member": ("dataset_id", "projects/{project}/datasets/{}"),
    "google_pubsub_subscription_iam_member": ("subscription", "{}"),
    "google_pubsub_topic_iam_member": ("topic", "{}"),
    "google_artifact_registry_repository_iam_member": ("repository",
                                                       "projects/{project}/repositories/{}"),
    "google_cloud_run_v2_job_iam_member": ("name", "projects/{project}/jobs/{}"),
}


def terraform_grants(tf: Terraform | None = None) -> list[Grant]:
    """Every binding the Terraform gives an identity of :data:`IDENTITIES`."""
    tf = tf or Terraform(variables={"project": LOCAL_PROJECT})
    custom = {tf.attribute(address, "id"): frozenset(tf.value(body["permissions"]))
              for address, body in tf.resources.items()
              if address.startswith("google_project_iam_custom_role.")}
    grants = []
    for address, body in tf.resources.items():
        rtype = address.split(".")[0]
        if rtype not in SCOPES:
            continue
        identity = _member_identity(tf, body)
        if identity is None:
            continue
        key, form = SCOPES[rtype]
        scope = form.format(tf.value(body[key]), project=tf.values.get("project"))
        condition: tuple[tuple[str, str], ...] = ()
        for block in body.get("condition", []) or []:
            expression = str(tf.value(block.get("expression", "")))
            condition = tuple(("startsWith", v) for v in re.findall(
                r'resource\.name\.startsWith\("([^"]*)"\)', expression))
            condition += tuple(("==", v) for v in re.findall(
                r'resource\.name\s*==\s*"([^"]*)"', expression))
        role = str(tf.value(body["role"]))
        grants.append(Grant(address, identity, role, scope, condition,
                            custom.get(role, frozenset())))
    return grants


# --- the calls ----------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Need:
    identity: str
    permission: str
    resource: str


_TABLE = re.compile(r"`?([\w-]+)[.:]([\w-]+)\.([\w-]+)`?")


def _storage_needs(call: dict, existing: set[str]) -> list[tuple[str, str]]:
    method, path = call["method"], unquote(call.get("path", ""))
    bucket_path = re.match(r"^(?:/download|/upload)?/storage/v1/b/([^/]+)(?:/o(?:/(.+))?)?$",
                           path)
    if bucket_path:
        bucket, obj = bucket_path.group(1), bucket_path.group(2)
        tail = re.match(r"^(.+)/(copyTo|rewriteTo)/b/([^/]+)/o/(.+)$", obj or "")
        if tail:
            return [("storage.objects.get", _obj(bucket, tail.group(1))),
                    ("storage.objects.create", _obj(tail.group(3), tail.group(4)))]
        if obj is None and path.endswith("/o"):
            if method == "GET":
                return [("storage.objects.list", f"projects/_/buckets/{bucket}")]
            name = call.get("object")
            return _create(bucket, name, existing) if name else []
        if obj is None:
            return [("storage.buckets.get", f"projects/_/buckets/{bucket}")]
        if obj.endswith("/compose"):
            return [("storage.objects.create", _obj(bucket, obj[: -len("/compose")]))]
        return {"GET": [("storage.objects.get", _obj(bucket, obj))],
                "HEAD": [("storage.objects.get", _obj(bucket, obj))],
                "DELETE": [("storage.objects.delete", _obj(bucket, obj))],
                "PATCH": [("storage.objects.update", _obj(bucket, obj))]}.get(method, [])
    if path.startswith("/storage/v1/b"):
        return [("storage.buckets.create", f"projects/{LOCAL_PROJECT}")] if method == "POST" \
            else []
    xml = re.match(r"^/([^/]+)/(.+)$", path)  # GDAL's /vsigs/ reads: the XML API
    if xml and method in ("GET", "HEAD"):
        return [("storage.objects.get", _obj(xml.group(1), xml.group(2)))]
    if xml and method == "PUT":
        return _create(xml.group(1), xml.group(2), existing)
    return []


def _obj(bucket: str, name: str) -> str:
    return f"projects/_/buckets/{bucket}/objects/{name}"


def _create(bucket: str, name: str, existing: set[str]) -> list[tuple[str, str]]:
    """A write: ``create``, and ``delete`` too when it replaces an object that exists."""
    resource = _obj(bucket, name)
    needs = [("storage.objects.create", resource)]
    if resource in existing:
        needs.append(("storage.objects.delete", resource))
    return needs


def _bigquery_needs(call: dict) -> list[tuple[str, str]]:
    method, path = call["method"], call.get("path", "")
    found = re.match(r"^/bigquery/v2/projects/([^/]+)(/.*)?$", path)
    if not found:
        return []
    project, rest = found.group(1), found.group(2) or ""
    table = re.match(r"^/datasets/([^/]+)/tables/([^/]+)(/insertAll|/data)?$", rest)
    if table:
        resource = f"projects/{project}/datasets/{table.group(1)}/tables/{table.group(2)}"
        if table.group(3) == "/insertAll":
            return [("bigquery.tables.updateData", resource)]
        if table.group(3) == "/data":
            return [("bigquery.tables.getData", resource)]
        return {"GET": [("bigquery.tables.get", resource)],
                "DELETE": [("bigquery.tables.delete", resource)],
                "PATCH": [("bigquery.tables.update", resource)],
                "PUT": [("bigquery.tables.update", resource)]}.get(method, [])
    tables = re.match(r"^/datasets/([^/]+)/tables$", rest)
    if tables:
        resource = f"projects/{project}/datasets/{tables.group(1)}"
        return [("bigquery.tables.create" if method == "POST" else "bigquery.tables.list",
                 resource)]
    dataset = re.match(r"^/datasets/([^/]+)$", rest)
    if dataset:
        return [("bigquery.datasets.get", f"projects/{project}/datasets/{dataset.group(1)}")]
    if rest == "/datasets" and method == "POST":
        return [("bigquery.datasets.create", f"projects/{project}")]
    if re.match(r"^/(jobs|queries)(/.*)?$", rest):
        needs = [("bigquery.jobs.create", f"projects/{project}")]  # own jobs: read as creator
        job = call.get("job") or {}
        if job.get("type") == "load" and job.get("table"):
            p, d, t = job["table"].split(".")
            resource = f"projects/{p}/datasets/{d}/tables/{t}"
            needs += [("bigquery.tables.updateData", resource),
                      ("bigquery.tables.update", resource)]
            if job.get("create") == "CREATE_IF_NEEDED":
                needs.append(("bigquery.tables.create", f"projects/{p}/datasets/{d}"))
            for uri in job.get("sources", []):  # BigQuery reads them as the caller
                bucket, _, name = uri[len("gs://"):].partition("/")
                needs.append(("storage.objects.get", _obj(bucket, name)))
        if job.get("type") == "query":
            sql = job.get("sql", "")
            writes = re.match(r"\s*(DELETE|UPDATE|INSERT|MERGE)\b", sql, re.IGNORECASE)
            alters = re.match(r"\s*ALTER\s+TABLE\b", sql, re.IGNORECASE)
            for p, d, t in _TABLE.findall(sql):
                resource = f"projects/{p}/datasets/{d}/tables/{t}"
                if alters:  # DDL on a table's schema: BigQuery checks update, as for a patch
                    needs.append(("bigquery.tables.update", resource))
                    continue
                needs.append(("bigquery.tables.updateData" if writes else
                              "bigquery.tables.getData", resource))
        return needs
    return []


def _pubsub_needs(call: dict) -> list[tuple[str, str]]:
    method, resource = call.get("method", ""), call.get("resource", "")
    if method in ("Pull", "StreamingPull", "Acknowledge", "ModifyAckDeadline", "Seek"):
        seek = [("pubsub.snapshots.seek", call["snapshot"])] if call.get("snapshot") else []
        return [("pubsub.subscriptions.consume", resource), *seek]
    project = "/".join(resource.split("/")[:2])
    if method == "CreateSnapshot":
        return [("pubsub.snapshots.create", project),
                ("pubsub.subscriptions.consume", call.get("subscription", ""))]
    if method == "DeleteSnapshot":
        return [("pubsub.snapshots.delete", resource)]
    return {"Publish": [("pubsub.topics.publish", resource)],
            "GetSubscription": [("pubsub.subscriptions.get", resource)],
            "GetTopic": [("pubsub.topics.get", resource)],
            "CreateTopic": [("pubsub.topics.create", project)],
            "DeleteSubscription": [("pubsub.subscriptions.delete", resource)],
            "CreateSubscription": [("pubsub.subscriptions.create", project),
                                   ("pubsub.topics.attachSubscription",
                                    call.get("topic", ""))]}.get(method, [])


@dataclass
class Names:
    """Local resource names read as the production ones: tests' own datasets, topics and
    subscriptions stand for the one the Terraform declares; a subscription whose name ends in
    ``-b`` stands for the second blue-green slot (``templates/terraform/releases.tf``)."""

    dataset: str = "tilestream"
    topic: str = "tilestream-tiles"
    subscription: str = "tilestream-tiles-sub"
    dead_letter_topic: str = "tilestream-tiles-dead-letter"
    results_topic: str = "tilestream-results"  # tests' own results topics: "<name>-results-<id>"

    def production(self, resource: str) -> str:
        resource = re.sub(r"^(projects/[^/]+/datasets/)[^/]+", rf"\g<1>{self.dataset}",
                          resource)
        topic = re.match(r"^(projects/[^/]+/topics/)([^/]+)$", resource)
        if topic:
            if topic.group(2).startswith(self.dead_letter_topic):
                return topic.group(1) + self.dead_letter_topic
            results = "-results" in topic.group(2) or topic.group(2) == self.results_topic
            return topic.group(1) + (self.results_topic if results else self.topic)
        sub = re.match(r"^(projects/[^/]+/subscriptions/)([^/]+)$", resource)
        if sub:
            if sub.group(2).startswith(self.dead_letter_topic):
                return sub.group(1) + f"{self.dead_letter_topic}-sub"
            slot_b = sub.group(2).endswith("-b")
            return sub.group(1) + self.subscription + ("-b" if slot_b else "")
        snapshot = re.match(r"^(projects/[^/]+/snapshots/)[^/]+$", resource)
        if snapshot:  # named per release and trial: one stands for all
            return snapshot.group(1) + f"{self.subscription}-seed"
        return resource


def needs_of(calls: Iterable[dict], names: Names | None = None) -> list[Need]:
    """What every call needs, in production names (calls that failed need nothing)."""
    names = names or Names()
    existing: set[str] = set()
    found = []
    for call in calls:
        status = int(call.get("status") or 0)
        service = call.get("service")
        if service == "storage":
            pairs = _storage_needs(call, existing)
        elif service == "bigquery":
            pairs = _bigquery_needs(call)
        else:
            pairs = _pubsub_needs(call)
        if status >= 400:
            continue
        for permission, resource in pairs:
            if permission == "storage.objects.create":
                existing.add(resource)
            elif permission == "storage.objects.delete" and call.get("method") == "DELETE":
                existing.discard(resource)
            found.append(Need(call.get("identity", "anonymous"), permission,
                              names.production(resource)))
    return found


def platform_needs(tf: Terraform | None = None) -> list[Need]:
    """What GCP's own services do as our identities, which no local run can record: Dataflow's
    Pub/Sub source reads the metadata of the subscription it reads (either blue-green slot) and
    the workers pull the image; Cloud Scheduler starts the rollback job as the rollback
    identity."""
    tf = tf or Terraform(variables={"project": LOCAL_PROJECT})
    project = tf.values["project"]
    return [
        *(Need("worker", "pubsub.subscriptions.get",
               tf.attribute(f"google_pubsub_subscription.{slot}", "id"))
          for slot in ("tiles", "tiles_b")),
        Need("worker", "artifactregistry.repositories.downloadArtifacts",
             f"projects/{project}/repositories/"
             f"{tf.attribute('google_artifact_registry_repository.images', 'name')}"),
        Need("rollback-rule", "run.jobs.run", f"projects/{project}/jobs/"
             f"{tf.attribute('google_cloud_run_v2_job.rollback_rule', 'name')}"),
    ]


def generalised(need: Need) -> Need:
    """A need as ``needs.json`` keeps it: objects by their top-level prefix."""
    found = re.match(r"^(projects/_/buckets/[^/]+/objects/)([^/]+)/.+$", need.resource)
    if found:
        return Need(need.identity, need.permission, f"{found.group(1)}{found.group(2)}/*")
    return need


# Calls a client library makes on its own and carries on without when they are denied: no grant
# is needed for them. google-cloud-storage fetches a bucket's metadata in the background
# (_bucket_metadata_cache) whenever it first touches a bucket.
TOLERATED = frozenset({"storage.buckets.get"})


# --- the verdict --------------------------------------------------------------------------------

@dataclass
class Report:
    denied: list[Need] = field(default_factory=list)
    allowed: dict[str, list[str]] = field(default_factory=dict)  # need -> grants allowing it
    unused: list[Grant] = field(default_factory=list)
    moot: list[str] = field(default_factory=list)  # conditions that restrict nothing
    not_evaluated: dict[str, int] = field(default_factory=dict)  # identity -> calls
    needs: list[Need] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"denied": [asdict(n) for n in self.denied],
                "unused_grants": [g.address for g in self.unused], "moot": self.moot,
                "not_evaluated": self.not_evaluated,
                "needs": len(self.needs), "identities": sorted({n.identity
                                                                for n in self.needs})}

    def text(self) -> str:
        lines = [f"{len(self.needs)} distinct needs of {len({n.identity for n in self.needs})} "
                 f"identities; {len(self.denied)} denied"
                 + ("; act: grant each DENIED need in templates/terraform before launching"
                    if self.denied else "; nothing to act on before launching")]
        lines += [f"DENIED {n.identity}: {n.permission} on {n.resource}" for n in self.denied]
        lines += [f"unused grant (no recorded call needs it; remove it unless a path the tests "
                  f"do not record uses it): {g.address} ({g.identity}, {g.role} on {g.scope})"
                  for g in self.unused]
        lines += [f"restricts nothing (for information, no action: a wider grant allows the "
                  f"same; the narrow one takes effect if the wider one goes): {m}"
                  for m in self.moot]
        return "\n".join(lines)


def evaluate(needs: Iterable[Need], grants: list[Grant]) -> Report:
    """Every need of an evaluated identity against the grants."""
    report = Report()
    used: set[str] = set()
    for need in sorted(set(needs)):
        if need.identity not in IDENTITIES:
            report.not_evaluated[need.identity] = report.not_evaluated.get(need.identity, 0) + 1
            continue
        report.needs.append(need)
        allowing = [g for g in grants if g.identity == need.identity
                    and g.allows(need.permission, need.resource)]
        if not allowing:
            if need.permission not in TOLERATED:
                report.denied.append(need)
            continue
        report.allowed[f"{need.identity} {need.permission} {need.resource}"] = [
            g.address for g in allowing]
        used |= {g.address for g in allowing}
        conditional = [g for g in allowing if g.condition]
        if conditional and len(allowing) > len(conditional):
            wider = sorted({g.address for g in allowing if not g.condition})
            for grant in conditional:
                note = (f"{grant.address}: {need.permission} is allowed anyway by "
                        f"{', '.join(wider)}")
                if note not in report.moot:
                    report.moot.append(note)
    report.unused = [g for g in grants if g.address not in used]
    return report


def load_needs(path: Path = NEEDS_FILE) -> list[Need]:
    return [Need(**n) for n in json.loads(path.read_text())["needs"]]


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to a file beside ``path``, then move it over ``path``: a reader never sees
    half a file, and an interrupted write leaves the old one."""
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text)
    os.replace(staged, path)


def write_needs(needs: Iterable[Need], path: Path = NEEDS_FILE) -> list[Need]:
    kept = sorted({generalised(n) for n in needs if n.identity in IDENTITIES})
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, json.dumps({
        "about": "What each identity needed in the last full recorded run of the stream, its "
                 "rollback rule and the model verbs on the local stack (make iam); evaluated "
                 "against templates/terraform by pipeline/ops/iam.py and deploy.sh preflight.",
        "needs": [asdict(n) for n in kept]}, indent=1) + "\n")
    return kept


def markdown(report: Report, grants: list[Grant]) -> str:
    """The identities, their grants, and what each grant is needed for: docs/deploy.md's table."""
    lines = ["| identity | grant (Terraform) | role on scope | needed for |", "|---|---|---|---|"]
    for grant in sorted(grants, key=lambda g: (g.identity, g.address)):
        uses = sorted({key.split(" ")[1] for key, allowing in report.allowed.items()
                       if grant.address in allowing and key.startswith(grant.identity + " ")})
        scope = grant.scope + (" where name " + " or ".join(
            f"starts with {v}" if op == "startsWith" else f"is {v}"
            for op, v in grant.condition) if grant.condition else "")
        lines.append(f"| {grant.identity} | `{grant.address}` | `{grant.role}` on `{scope}` | "
                     f"{', '.join(uses) or '(nothing recorded)'} |")
    return "\n".join(lines)


DOC_BEGIN, DOC_END = "<!-- BEGIN IAM TABLE: make iam -->", "<!-- END IAM TABLE -->"


def update_doc(path: Path, report: Report, grants: list[Grant]) -> None:
    """Rewrite the identities-and-grants table between the markers of ``path``."""
    text = path.read_text()
    begin, end = text.index(DOC_BEGIN) + len(DOC_BEGIN), text.index(DOC_END)
    _replace(path, text[:begin] + "\n" + markdown(report, grants) + "\n" + text[end:])


def parser():
    """The flags of ``tilestream iam``."""
    import argparse

    top = argparse.ArgumentParser(
        prog="tilestream iam", description="Least privilege: the API calls each identity made "
        "in the recorded test runs, against the grants templates/terraform gives it. Exit 1 "
        "when a need is denied (the first launch would fail there).")
    top.add_argument("--needs", type=Path, default=NEEDS_FILE,
                     help="recorded needs (default: templates/iam/needs.json)")
    top.add_argument("--markdown", action="store_true", help="the table of docs/deploy.md")
    return top


def main(argv: list[str] | None = None) -> int:
    """``tilestream iam``: the committed needs against the Terraform, as text or markdown."""
    args = parser().parse_args(argv)
    grants = terraform_grants()
    report = evaluate(load_needs(args.needs) + platform_needs(), grants)
    print(markdown(report, grants) if args.markdown else report.text())
    return 1 if report.denied else 0
