"""Deploy a release to AWS with boto3: what `make push` and `make deploy` run.

    python -m deploy.aws ecr-login                        # the engine logs in to ECR
    python -m deploy.aws output RepositoryUri --stack NAME   # one of the stack's outputs
    python -m deploy.aws deploy --image URI:SHA --lambda-zip ZIP (--stack NAME | --outputs FILE)
    python -m deploy.aws render --image URI:SHA (--stack NAME | --outputs FILE)   # print, no calls

A deploy, in order (each step waits for the one before):

1. register the task definitions in deploy/ecs/ (web, conductor, beat, migrate) for the image;
2. run the migrate task once (its deploy checks, then the migrations) and wait for it to exit 0:
   a failed check or migration stops the deploy before any service changes;
3. update the services (create them on the first deploy) to the new revisions: web and
   conductor roll (the old tasks drain), beat stops before its replacement starts (min 0 %,
   max 100 %: two beats never run);
4. update the worker function's code from the zip and its configuration (environment, timeout,
   memory), no retries of asynchronous invocations and a short maximum event age, and its
   reserved concurrency when LAMBDA_RESERVED_CONCURRENCY is given.

Where the infrastructure is comes from the CloudFormation stack's outputs (deploy/cloudformation/
emailops.yaml) or a JSON file of the same keys. Endpoints honour AWS_ENDPOINT_URL (the tests run
this against moto's server).
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent
ECS_DIR = HERE / "ecs"
ROLES = ("web", "conductor", "beat", "migrate")
SERVICES = ("emailops-web", "emailops-conductor", "emailops-beat")

# Secrets the tasks get from Secrets Manager: variable -> (stack output naming the secret, JSON
# key in it). A new one is a line here and a key in that secret; the execution role may already
# read the whole secret.
SECRETS: dict[str, tuple[str, str]] = {
    "SECRET_KEY": ("AppSecretArn", "SECRET_KEY"),
    "SECRET_KEY_FALLBACKS": ("AppSecretArn", "SECRET_KEY_FALLBACKS"),
    "FIELD_ENCRYPTION_KEY": ("AppSecretArn", "FIELD_ENCRYPTION_KEY"),
    "WORKER_TOKEN_KEY": ("WorkerTokenSecretArn", "WORKER_TOKEN_KEY"),
    "WORKER_TOKEN_KEY_FALLBACKS": ("WorkerTokenSecretArn", "WORKER_TOKEN_KEY_FALLBACKS"),
    "UNSUBSCRIBE_KEY": ("AppSecretArn", "UNSUBSCRIBE_KEY"),
    "ANYMAIL_WEBHOOK_SECRET": ("AppSecretArn", "ANYMAIL_WEBHOOK_SECRET"),
    "DATABASE_PASSWORD": ("DatabaseSecretArn", "password"),
}
# Only the web task serves TLS itself, in the load-balancer-less setup.
WEB_TLS_SECRETS: dict[str, tuple[str, str]] = {
    "TLS_CERT": ("TlsSecretArn", "certificate"),
    "TLS_KEY": ("TlsSecretArn", "private_key"),
}
# Plain settings every task gets: variable -> stack output.
ENVIRONMENT: dict[str, str] = {
    "ALLOWED_HOSTS": "AllowedHosts",
    "CSRF_TRUSTED_ORIGINS": "CsrfTrustedOrigins",
    "DATABASE_URL": "DatabaseUrl",
    "REDIS_URL": "RedisUrl",
    "WORKER_API_URL": "WorkerApiUrl",
    "LAMBDA_FUNCTION_NAME": "WorkerFunctionName",
}
FIXED_ENVIRONMENT = {
    "DEBUG": "false",
    "LOG_FORMAT": "json",
    "WORKER_RUNTIME": "lambda",
    "BEHIND_TLS_PROXY": "true",
}
# Lambda's settings for the worker function (asynchronous invocations).
WORKER_TIMEOUT_S = 900
WORKER_MEMORY_MB = 512
MAX_EVENT_AGE_S = 60  # a worker that starts a minute late is useless
WORKER_HANDLER = "sending.worker.handler"
WORKER_RUNTIME = "python3.11"


class DeployError(Exception):
    pass


def client(service: str, region: str):
    import boto3

    return boto3.client(service, region_name=region)


def stack_outputs(stack: str, region: str) -> dict[str, str]:
    stacks = client("cloudformation", region).describe_stacks(StackName=stack)["Stacks"]
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def load_outputs(args) -> dict[str, str]:
    if args.outputs:
        return json.loads(Path(args.outputs).read_text())
    if args.stack:
        return stack_outputs(args.stack, args.region)
    raise DeployError("say where the infrastructure is: --stack NAME or --outputs FILE")


def _substitute(value, values: dict):
    """`${Name}` alone takes the value as it is (a list, a dict); inside a string, as text."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\$\{(\w+)\}", value)
        if whole:
            if whole.group(1) not in values:
                raise DeployError(f"no value for ${{{whole.group(1)}}}")
            return copy.deepcopy(values[whole.group(1)])
        try:
            return Template(value).substitute(values)
        except KeyError as exc:
            raise DeployError(f"no value for ${{{exc.args[0]}}} in {value!r}") from exc
    if isinstance(value, list):
        return [_substitute(item, values) for item in value]
    if isinstance(value, dict):
        return {key: _substitute(item, values) for key, item in value.items()}
    return value


def _secrets(outputs: dict, table: dict) -> list[dict]:
    return [
        {"name": name, "valueFrom": f"{outputs[output]}:{key}::"}
        for name, (output, key) in table.items()
        if outputs.get(output)
    ]


def task_values(outputs: dict, *, image: str, region: str, role: str) -> dict:
    environment = dict(FIXED_ENVIRONMENT)
    environment["AWS_REGION"] = region
    for name, output in ENVIRONMENT.items():
        if outputs.get(output):
            environment[name] = outputs[output]
    if os.environ.get("LAMBDA_RESERVED_CONCURRENCY"):
        environment["LAMBDA_RESERVED_CONCURRENCY"] = os.environ["LAMBDA_RESERVED_CONCURRENCY"]
    secrets = _secrets(outputs, SECRETS)
    if role == "web" and outputs.get("Route53ZoneId"):
        # The load-balancer-less setup: the task registers itself and serves TLS.
        environment["ROUTE53_ZONE_ID"] = outputs["Route53ZoneId"]
        environment["ROUTE53_RECORD_NAME"] = outputs["Route53RecordName"]
        secrets += _secrets(outputs, WEB_TLS_SECRETS)
    return {
        **outputs,
        "Image": image,
        "Region": region,
        "Environment": [{"name": k, "value": v} for k, v in sorted(environment.items())],
        "Secrets": secrets,
    }


def task_definition(role: str, outputs: dict, *, image: str, region: str) -> dict:
    template = json.loads((ECS_DIR / f"{role}.json").read_text())
    return _substitute(template, task_values(outputs, image=image, region=region, role=role))


def network(outputs: dict) -> dict:
    return {
        "awsvpcConfiguration": {
            "subnets": outputs["PrivateSubnets"].split(","),
            "securityGroups": [outputs["AppSecurityGroup"]],
            "assignPublicIp": "DISABLED",
        }
    }


def service_specs(outputs: dict) -> dict[str, dict]:
    balancers = [
        {"targetGroupArn": arn, "containerName": "web", "containerPort": 8000}
        for arn in (outputs.get("InternalTargetGroupArn"), outputs.get("PublicTargetGroupArn"))
        if arn
    ]
    specs = _substitute(
        json.loads((ECS_DIR / "services.json").read_text()), {"WebLoadBalancers": balancers}
    )
    for spec in specs.values():
        spec["networkConfiguration"] = network(outputs)
    return specs


# --- deploy -----------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"deploy: {text}", flush=True)


def register(ecs, outputs: dict, *, image: str, region: str) -> dict[str, str]:
    arns = {}
    for role in ROLES:
        definition = task_definition(role, outputs, image=image, region=region)
        arn = ecs.register_task_definition(**definition)["taskDefinition"]["taskDefinitionArn"]
        say(f"registered {arn}")
        arns[role] = arn
    return arns


def migrate(ecs, outputs: dict, task_definition_arn: str, *, timeout_s: float) -> None:
    response = ecs.run_task(
        cluster=outputs["ClusterName"],
        taskDefinition=task_definition_arn,
        launchType="FARGATE",
        networkConfiguration=network(outputs),
        startedBy="emailops-deploy",
    )
    if response.get("failures"):
        raise DeployError(f"the migrate task did not start: {response['failures']}")
    task_arn = response["tasks"][0]["taskArn"]
    say(f"migrate task {task_arn} started; waiting for it to exit")
    deadline = time.monotonic() + timeout_s
    while True:
        task = ecs.describe_tasks(cluster=outputs["ClusterName"], tasks=[task_arn])["tasks"][0]
        if task.get("lastStatus") == "STOPPED":
            break
        if time.monotonic() > deadline:
            raise DeployError(f"the migrate task is still {task.get('lastStatus')} after "
                              f"{timeout_s:g} s: stop it and look at its log")  # fmt: skip
        time.sleep(5 if timeout_s > 60 else 0.5)
    codes = [c.get("exitCode") for c in task.get("containers", [])]
    if codes != [0]:
        raise DeployError(
            f"the migrate task exited {codes} ({task.get('stoppedReason', '')}): services "
            "were not updated; its log is in the migrate log group"
        )
    say("migrations applied")


def update_services(ecs, outputs: dict, arns: dict[str, str]) -> None:
    cluster = outputs["ClusterName"]
    specs = service_specs(outputs)
    existing = {
        s["serviceName"]
        for s in ecs.describe_services(cluster=cluster, services=list(specs))["services"]
        if s.get("status") == "ACTIVE"
    }
    for name, spec in specs.items():
        role = name.removeprefix("emailops-")
        spec = {**spec, "taskDefinition": arns[role]}
        if name in existing:
            ecs.update_service(
                cluster=cluster,
                service=name,
                taskDefinition=spec["taskDefinition"],
                deploymentConfiguration=spec["deploymentConfiguration"],
                networkConfiguration=spec["networkConfiguration"],
            )
            say(f"updated service {name} to {arns[role]}")
        else:
            ecs.create_service(
                cluster=cluster,
                serviceName=name,
                launchType="FARGATE",
                enableExecuteCommand=True,
                **spec,
            )
            say(f"created service {name} with {arns[role]}")


def update_worker_function(lam, outputs: dict, zip_path: Path, *, region: str) -> None:
    name = outputs["WorkerFunctionName"]
    code = zip_path.read_bytes()
    digest = base64.b64encode(hashlib.sha256(code).digest()).decode()
    current = lam.get_function_configuration(FunctionName=name)
    if current.get("CodeSha256") != digest:
        lam.update_function_code(FunctionName=name, ZipFile=code)
        lam.get_waiter("function_updated_v2").wait(FunctionName=name)
        say(f"worker function {name}: code {digest}")
    else:
        say(f"worker function {name}: code unchanged")
    environment = {"LOG_LEVEL": os.environ.get("WORKER_LOG_LEVEL", "INFO")}
    for variable in ("REQUESTS_CA_BUNDLE",):
        if os.environ.get(variable):
            environment[variable] = os.environ[variable]
    lam.update_function_configuration(
        FunctionName=name,
        Runtime=WORKER_RUNTIME,
        Handler=WORKER_HANDLER,
        Timeout=WORKER_TIMEOUT_S,
        MemorySize=WORKER_MEMORY_MB,
        Environment={"Variables": environment},
    )
    lam.get_waiter("function_updated_v2").wait(FunctionName=name)
    lam.put_function_event_invoke_config(
        FunctionName=name, MaximumRetryAttempts=0, MaximumEventAgeInSeconds=MAX_EVENT_AGE_S
    )
    reserved = os.environ.get("LAMBDA_RESERVED_CONCURRENCY")
    if reserved:
        lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=int(reserved))
    say(f"worker function {name}: configured (no retries, events expire after "
        f"{MAX_EVENT_AGE_S} s, reserved concurrency {reserved or 'unchanged'})")  # fmt: skip


def deploy(args) -> None:
    outputs = load_outputs(args)
    zip_path = Path(args.lambda_zip)
    if not zip_path.is_file():
        raise DeployError(f"{zip_path} does not exist: run `make lambda` first")
    ecs = client("ecs", args.region)
    arns = register(ecs, outputs, image=args.image, region=args.region)
    migrate(ecs, outputs, arns["migrate"], timeout_s=args.migrate_timeout)
    update_services(ecs, outputs, arns)
    update_worker_function(client("lambda", args.region), outputs, zip_path, region=args.region)
    say(f"deployed {args.image}")


# --- push -------------------------------------------------------------------------------------


def ecr_login(args) -> None:
    """Log the engine in to this account's registry; the password goes through stdin."""
    token = client("ecr", args.region).get_authorization_token()["authorizationData"][0]
    user, password = base64.b64decode(token["authorizationToken"]).decode().split(":", 1)
    registry = token["proxyEndpoint"].removeprefix("https://")
    subprocess.run([args.engine, "login", "--username", user, "--password-stdin", registry],
                   input=password, text=True, check=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.aws", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=("deploy", "render", "ecr-login", "output"))
    parser.add_argument("name", nargs="?", help="output: the stack output to print")
    parser.add_argument("--image", help="deploy, render: the image URI with its tag")
    parser.add_argument("--stack", default=os.environ.get("STACK"))
    parser.add_argument("--outputs", help="a JSON file of the stack's outputs, instead of --stack")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION", "us-east-1"))
    parser.add_argument("--engine", default=os.environ.get("ENGINE", "podman"))
    parser.add_argument("--lambda-zip", default="dist/emailops-worker.zip")
    parser.add_argument("--migrate-timeout", type=float, default=900)
    args = parser.parse_args(argv)
    try:
        if args.command in ("deploy", "render") and not args.image:
            raise DeployError(f"{args.command} needs --image URI:TAG")
        if args.command == "ecr-login":
            ecr_login(args)
        elif args.command == "output":
            print(load_outputs(args)[args.name])
        elif args.command == "deploy":
            deploy(args)
        else:
            outputs = load_outputs(args)
            rendered = {
                "taskDefinitions": {
                    role: task_definition(role, outputs, image=args.image, region=args.region)
                    for role in ROLES
                },
                "services": service_specs(outputs),
            }
            print(json.dumps(rendered, indent=2))
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
