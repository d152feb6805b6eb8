"""The AWS side, offline: the CloudFormation template (cfn-lint and what it grants), the task
definitions (ECS's own request model, our JSON schema, moto's register_task_definition), and
`make deploy`'s program run against moto's server."""

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import boto3
import jsonschema
import pytest
import requests

from deploy import aws
from tests.aws import moto_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent.parent
TEMPLATE = ROOT / "deploy" / "cloudformation" / "emailops.yaml"
SCHEMA = json.loads((ROOT / "deploy" / "ecs" / "taskdef.schema.json").read_text())
ACCOUNT = "123456789012"
IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/emailops:0123456789ab"


def template() -> dict:
    from cfnlint.decode import decode

    parsed, problems = decode(str(TEMPLATE))
    assert not problems
    return parsed


def fake_outputs(**overrides) -> dict:
    arn = f"arn:aws:iam::{ACCOUNT}:role"
    secret = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret"
    return {
        "ClusterName": "emailops",
        "RepositoryUri": IMAGE.rsplit(":", 1)[0],
        "ExecutionRoleArn": f"{arn}/emailops-execution",
        "WebTaskRoleArn": f"{arn}/emailops-web",
        "ConductorTaskRoleArn": f"{arn}/emailops-conductor",
        "BeatTaskRoleArn": f"{arn}/emailops-beat",
        "AppSecretArn": f"{secret}:emailops/app-AbCdEf",
        "DatabaseSecretArn": f"{secret}:emailops/database-AbCdEf",
        "WorkerTokenSecretArn": f"{secret}:emailops/worker-token-AbCdEf",
        "PrivateSubnets": "subnet-0a,subnet-0b",
        "AppSecurityGroup": "sg-0app",
        "InternalTargetGroupArn": "",
        "PublicTargetGroupArn": "",
        "WebLogGroup": "/emailops/web",
        "ConductorLogGroup": "/emailops/conductor",
        "BeatLogGroup": "/emailops/beat",
        "MigrateLogGroup": "/emailops/migrate",
        "WorkerFunctionName": "emailops-worker",
        "DatabaseUrl": "postgres://emailops@db.internal:5432/emailops",
        "RedisUrl": "rediss://redis.internal:6379/0?ssl_cert_reqs=required",
        "WorkerApiUrl": "https://emailops.internal.example.edu/api/worker/v1/",
        "AllowedHosts": "emailops.internal.example.edu,mail.example.edu",
        "CsrfTrustedOrigins": "https://emailops.internal.example.edu",
        **overrides,
    }


# --- the template ------------------------------------------------------------------------------


def test_cfn_lint_finds_nothing():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), str(TEMPLATE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _statements(resource) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "Effect" in node and "Action" in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(resource.get("Properties", {}))
    return [s for s in found if s["Action"] != "sts:AssumeRole"]


def test_roles_grant_only_what_each_role_needs():
    resources = template()["Resources"]
    roles = {
        n: r
        for n, r in resources.items()
        if r["Type"] in ("AWS::IAM::Role", "AWS::IAM::ManagedPolicy")
    }
    for name, role in roles.items():
        for statement in _statements(role):
            actions = (
                statement["Action"]
                if isinstance(statement["Action"], list)
                else [statement["Action"]]
            )
            assert all("*" not in action for action in actions), (name, actions)
            if statement.get("Resource") == "*":
                # Only actions that take no resource-level restriction.
                assert all(
                    (a.startswith(("ssmmessages:", "ec2:")) and "NetworkInterface" in a)
                    or a.startswith("ssmmessages:")
                    or a.endswith("PrivateIpAddresses")
                    for a in actions
                ), (name, actions)
    conductor = _statements(resources["ConductorTaskRole"])
    assert conductor == [
        {
            "Effect": "Allow",
            "Action": "lambda:InvokeFunction",
            "Resource": {"Fn::GetAtt": ["WorkerFunction", "Arn"]},
        },
    ]
    (route53,) = [s for s in _statements(resources["WebTaskRole"]) if s["Effect"] == "Allow"]
    assert route53["Action"] == "route53:ChangeResourceRecordSets"
    assert "${PrivateZone}" in route53["Resource"]["Fn::Sub"]  # one zone
    assert "route53:ChangeResourceRecordSetsRecordTypes" in json.dumps(route53["Condition"])
    secrets = _statements(resources["ExecutionRole"])[-1]
    assert secrets["Action"] == "secretsmanager:GetSecretValue"
    assert {"Ref": "AppSecret"} in secrets["Resource"]
    assert {"Ref": "WorkerTokenSecret"} in secrets["Resource"]
    assert "*" not in json.dumps(secrets["Resource"])
    # Provider credentials by reference: read-only, under the one parameterized path.
    worker = _statements(resources["WorkerFunctionRole"])
    by_reference = {s["Action"]: s["Resource"]["Fn::Sub"] for s in worker if "Get" in s["Action"]}
    assert by_reference == {
        "secretsmanager:GetSecretValue": "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:"
        "${AWS::AccountId}:secret:${ProviderCredentialsPath}/*",
        "ssm:GetParameter": "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:"
        "parameter/${ProviderCredentialsPath}/*",
    }


def test_only_public_paths_reach_the_app_from_the_internet():
    resources = template()["Resources"]
    listener = resources["PublicListener"]["Properties"]
    assert listener["DefaultActions"][0]["Type"] == "fixed-response"
    assert listener["DefaultActions"][0]["FixedResponseConfig"]["StatusCode"] == "404"
    rules = [
        r["Properties"]
        for r in resources.values()
        if r["Type"] == "AWS::ElasticLoadBalancingV2::ListenerRule"
    ]
    public_rules = [r for r in rules if r["ListenerArn"] == {"Ref": "PublicListener"}]
    assert len(public_rules) == 1
    paths = [c for c in public_rules[0]["Conditions"] if c["Field"] == "path-pattern"]
    assert paths[0]["PathPatternConfig"]["Values"] == ["/public/*"]
    assert resources["InternalLoadBalancer"]["Properties"]["Scheme"] == "internal"
    # The app's tasks take traffic only from the load balancers (and the workers, when the
    # workers reach them directly); nothing in the VPC has a public address.
    assert "SecurityGroupIngress" not in resources["AppSecurityGroup"]["Properties"]
    for name in ("PrivateSubnetA", "PrivateSubnetB"):
        assert not resources[name]["Properties"].get("MapPublicIpOnLaunch")


def test_the_worker_function_is_never_retried_expires_quickly_and_runs_in_the_vpc():
    resources = template()["Resources"]
    invoke = resources["WorkerEventInvokeConfig"]["Properties"]
    assert invoke["MaximumRetryAttempts"] == 0
    assert invoke["MaximumEventAgeInSeconds"] <= 60
    function = resources["WorkerFunction"]["Properties"]
    assert function["Runtime"] == "python3.11"
    assert function["ReservedConcurrentExecutions"] == {"Ref": "WorkerReservedConcurrency"}
    assert function["VpcConfig"]["SubnetIds"] == [
        {"Ref": "PrivateSubnetA"},
        {"Ref": "PrivateSubnetB"},
    ]
    assert function["LoggingConfig"]["LogFormat"] == "JSON"


def test_alarms_cover_a_silent_conductor_throttling_and_5xx():
    alarms = {
        r["Properties"]["AlarmName"]: r["Properties"]
        for r in template()["Resources"].values()
        if r["Type"] == "AWS::CloudWatch::Alarm"
    }
    assert alarms["emailops-conductor-silent"]["TreatMissingData"] == "breaching"
    assert alarms["emailops-provider-throttling"]["MetricName"] == "ProviderThrottledBatches"
    assert alarms["emailops-worker-concurrency-throttled"]["MetricName"] == "Throttles"
    assert {alarms[n]["MetricName"] for n in ("emailops-internal-5xx", "emailops-public-5xx")} == {
        "HTTPCode_Target_5XX_Count"
    }


# --- task definitions ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", aws.ROLES)
def test_task_definitions_match_ecs_model_and_our_rules(role):
    from botocore.session import get_session
    from botocore.validate import validate_parameters

    definition = aws.task_definition(role, fake_outputs(), image=IMAGE, region="us-east-1")
    jsonschema.validate(definition, SCHEMA)
    model = get_session().get_service_model("ecs")
    validate_parameters(definition, model.operation_model("RegisterTaskDefinition").input_shape)
    container = definition["containerDefinitions"][0]
    names = {s["name"] for s in container["secrets"]}
    assert {"SECRET_KEY", "FIELD_ENCRYPTION_KEY", "WORKER_TOKEN_KEY", "DATABASE_PASSWORD"} <= names
    environment = {e["name"]: e["value"] for e in container["environment"]}
    assert environment["DEBUG"] == "false" and environment["WORKER_RUNTIME"] == "lambda"
    assert environment["WORKER_API_URL"].startswith("https://")
    if role in ("web", "conductor"):
        assert "healthCheck" in container


def test_self_registration_gives_the_web_task_its_zone_and_tls_secrets_only():
    outputs = fake_outputs(
        Route53ZoneId="Z0PRIVATE",
        Route53RecordName="workers.internal.example.edu",
        TlsSecretArn=f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:emailops/tls-x",
    )
    web = aws.task_definition("web", outputs, image=IMAGE, region="us-east-1")
    conductor = aws.task_definition("conductor", outputs, image=IMAGE, region="us-east-1")
    web_env = {e["name"] for e in web["containerDefinitions"][0]["environment"]}
    assert {"ROUTE53_ZONE_ID", "ROUTE53_RECORD_NAME"} <= web_env
    assert {"TLS_CERT", "TLS_KEY"} <= {s["name"] for s in web["containerDefinitions"][0]["secrets"]}
    assert "TLS_KEY" not in json.dumps(conductor)


def test_services_keep_tasks_private_and_never_run_two_beats():
    specs = aws.service_specs(fake_outputs(InternalTargetGroupArn="arn:tg/internal"))
    for spec in specs.values():
        assert spec["networkConfiguration"]["awsvpcConfiguration"]["assignPublicIp"] == "DISABLED"
    beat = specs["emailops-beat"]["deploymentConfiguration"]
    assert (beat["minimumHealthyPercent"], beat["maximumPercent"]) == (0, 100)
    assert specs["emailops-web"]["loadBalancers"] == [
        {"targetGroupArn": "arn:tg/internal", "containerName": "web", "containerPort": 8000}
    ]


# --- make -n and make deploy against moto's server ----------------------------------------------


def test_make_n_prints_the_real_commands_without_aws(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path)  # no credentials file either
    result = subprocess.run(
        ["make", "-n", "image", "push", "lambda", "deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    out = result.stdout
    sha = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert f"IMAGE=localhost/emailops:{sha} deploy/local-image.sh build" in out
    assert "-m deploy.aws ecr-login --region us-east-1 --engine podman" in out
    assert "podman push $(.venv/bin/python -m deploy.aws output RepositoryUri" in out
    assert f"deploy/lambda_build.py --out dist/emailops-worker-{sha}.zip" in out
    assert "-m deploy.aws deploy --stack emailops" in out
    assert f"--lambda-zip dist/emailops-worker-{sha}.zip" in out


def small_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("sending/worker.py", "def handler(event, context):\n    return {}\n")
    return buffer.getvalue()


@pytest.fixture
def infrastructure(moto_server, tmp_path):  # noqa: F811
    """What the CloudFormation stack would have made, made in moto; its outputs as a file."""
    iam = boto3.client("iam")
    trust = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "lambda.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
    )
    roles = {
        name: iam.create_role(RoleName=f"emailops-{name}", AssumeRolePolicyDocument=trust)["Role"][
            "Arn"
        ]
        for name in ("execution", "web", "conductor", "beat", "worker")
    }
    ec2 = boto3.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})  # as the template
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.40.{i}.0/24")["Subnet"]["SubnetId"]
        for i in (2, 3)
    ]
    group = ec2.create_security_group(GroupName="app", Description="app", VpcId=vpc)["GroupId"]
    secrets = boto3.client("secretsmanager")
    app = secrets.create_secret(Name="emailops/app", SecretString="{}")["ARN"]
    database = secrets.create_secret(Name="emailops/database", SecretString="{}")["ARN"]
    boto3.client("ecs").create_cluster(clusterName="emailops")
    boto3.client("lambda").create_function(
        FunctionName="emailops-worker",
        Runtime="python3.11",
        Role=roles["worker"],
        Handler="index.handler",
        Code={"ZipFile": small_zip()},
        Timeout=30,
    )
    outputs = fake_outputs(
        ExecutionRoleArn=roles["execution"],
        WebTaskRoleArn=roles["web"],
        ConductorTaskRoleArn=roles["conductor"],
        BeatTaskRoleArn=roles["beat"],
        AppSecretArn=app,
        DatabaseSecretArn=database,
        PrivateSubnets=",".join(subnets),
        AppSecurityGroup=group,
    )
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(outputs))
    zip_path = tmp_path / "worker.zip"
    zip_path.write_bytes(small_zip() + b"")  # the real zip is tested in test_lambda_package
    return path, zip_path


def run_deploy(outputs, zip_path, env, *, migrate_timeout="30"):
    command = [sys.executable, "-m", "deploy.aws", "deploy", "--outputs", str(outputs)]
    command += ["--image", IMAGE, "--lambda-zip", str(zip_path)]
    command += ["--migrate-timeout", migrate_timeout]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_deploy_registers_migrates_updates_services_and_the_worker_function(
    infrastructure,
    moto_server,  # noqa: F811
):
    outputs, zip_path = infrastructure
    env = {**os.environ, **moto_server.env, "LAMBDA_RESERVED_CONCURRENCY": "25"}
    # moto's ECS runs a task to STOPPED (exit code 0) as it is described, as a quick migrate
    # task would.
    first = run_deploy(outputs, zip_path, env)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_deploy(outputs, zip_path, env)
    assert second.returncode == 0, second.stdout + second.stderr

    ecs = boto3.client("ecs")
    for role in aws.ROLES:
        arns = ecs.list_task_definitions(familyPrefix=f"emailops-{role}")["taskDefinitionArns"]
        assert [a.rsplit(":", 1)[-1] for a in arns] == ["1", "2"]  # one revision per deploy
        definition = ecs.describe_task_definition(taskDefinition=f"emailops-{role}")
        container = definition["taskDefinition"]["containerDefinitions"][0]
        assert container["image"] == IMAGE and container["stopTimeout"] == 120
    services = ecs.describe_services(cluster="emailops", services=list(aws.SERVICES))["services"]
    assert {s["serviceName"] for s in services} == set(aws.SERVICES)
    for service in services:
        assert service["taskDefinition"].endswith(":2")
        network = service["networkConfiguration"]["awsvpcConfiguration"]
        assert network["assignPublicIp"] == "DISABLED"
    beat = next(s for s in services if s["serviceName"] == "emailops-beat")
    assert beat["deploymentConfiguration"]["minimumHealthyPercent"] == 0
    assert beat["deploymentConfiguration"]["maximumPercent"] == 100
    migrations = ecs.list_tasks(cluster="emailops", startedBy="emailops-deploy")["taskArns"]
    described = ecs.describe_tasks(cluster="emailops", tasks=migrations)["tasks"]
    assert len(described) == 2  # one per deploy, before the services changed
    assert {t["lastStatus"] for t in described} == {"STOPPED"}
    assert {t["taskDefinitionArn"].rsplit("/", 1)[-1] for t in described} == {
        "emailops-migrate:1",
        "emailops-migrate:2",
    }
    assert first.stdout.index("migrations applied") < first.stdout.index("created service")
    assert "updated service emailops-web" in second.stdout

    lam = boto3.client("lambda")
    function = lam.get_function_configuration(FunctionName="emailops-worker")
    assert function["Handler"] == "sending.worker.handler"
    assert function["Runtime"] == "python3.11"
    assert function["Timeout"] == aws.WORKER_TIMEOUT_S
    invoke = lam.get_function_event_invoke_config(FunctionName="emailops-worker")
    assert invoke["MaximumRetryAttempts"] == 0
    assert invoke["MaximumEventAgeInSeconds"] == aws.MAX_EVENT_AGE_S
    assert (
        lam.get_function_concurrency(FunctionName="emailops-worker")["ReservedConcurrentExecutions"]
        == 25
    )
    assert "code unchanged" in second.stdout


def test_deploy_stops_before_the_services_when_the_migrate_task_does_not_finish(
    infrastructure,
    moto_server,  # noqa: F811
):
    outputs, zip_path = infrastructure
    env = {**os.environ, **moto_server.env}
    # A migrate task that keeps running (a lock wait, a long migration).
    transition = {
        "model_name": "ecs::task",
        "transition": {"progression": "manual", "times": 1_000_000},
    }
    requests.post(
        f"{moto_server.url}/moto-api/state-manager/set-transition", json=transition, timeout=10
    ).raise_for_status()
    result = run_deploy(outputs, zip_path, env, migrate_timeout="2")
    assert result.returncode == 1
    assert "the migrate task is still" in result.stderr
    services = boto3.client("ecs").describe_services(
        cluster="emailops", services=list(aws.SERVICES)
    )["services"]
    assert [s for s in services if s.get("status") == "ACTIVE"] == []


def test_deploy_without_a_package_says_what_to_run(infrastructure, moto_server):  # noqa: F811
    outputs, _ = infrastructure
    result = run_deploy(outputs, "/nonexistent.zip", {**os.environ, **moto_server.env})
    assert result.returncode == 1 and "run `make lambda` first" in result.stderr


def test_make_deploy_finds_the_stack_and_deploys_the_image_of_this_commit(
    infrastructure,
    moto_server,  # noqa: F811
):
    """`make deploy` itself: the stack's outputs and repository come from CloudFormation."""
    outputs_file, zip_path = infrastructure
    outputs = json.loads(outputs_file.read_text())
    template = {
        "Resources": {"Marker": {"Type": "AWS::SNS::Topic"}},
        "Outputs": {key: {"Value": value} for key, value in outputs.items() if value},
    }
    boto3.client("cloudformation").create_stack(StackName="emailops-test",
                                                 TemplateBody=json.dumps(template))  # fmt: skip
    env = {**os.environ, **moto_server.env}
    result = subprocess.run(
        ["make", "deploy", "STACK=emailops-test", f"LAMBDA_ZIP={zip_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert "lambda_build.py" not in result.stdout  # the zip was newer than its sources
    definition = boto3.client("ecs").describe_task_definition(taskDefinition="emailops-web")
    image = definition["taskDefinition"]["containerDefinitions"][0]["image"]
    assert image == f"{outputs['RepositoryUri']}:{sha}"
