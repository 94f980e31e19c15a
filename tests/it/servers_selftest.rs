//! Proves the test servers themselves before any nightcopy test relies on them: the CloudWatch
//! endpoint stores what aws-sdk-cloudwatch publishes and serves it back, and the IMDS stand-in
//! drives aws-config's default credential chain through the IMDSv2 token flow.

use aws_config::BehaviorVersion;
use aws_sdk_cloudwatch::config::ProvideCredentials;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};
use aws_types::os_shim_internal::{Env, Fs};

use crate::common::cloudwatch::{block_on, cloudwatch, unique_namespace};
use crate::common::imds::start_imds;

/// The six figures nightcopy publishes at the end of a run, with their units.
const SIX: [(&str, StandardUnit, f64); 6] = [
    ("LastSuccess", StandardUnit::None, 1_795_305_600.0),
    ("FilesTransferred", StandardUnit::Count, 1234.0),
    ("BytesTransferred", StandardUnit::Bytes, 98_765_432.0),
    ("Checks", StandardUnit::Count, 20_000.0),
    ("TransferErrors", StandardUnit::Count, 0.0),
    ("ElapsedSeconds", StandardUnit::Seconds, 42.5),
];

#[test]
fn six_metrics_in_one_put_are_stored_and_read_back() {
    let cw = cloudwatch();
    let namespace = unique_namespace("selftest-six");
    // A dimension value of its own too: moto's GetMetricData ignores Namespace when dimensions
    // are given (the helper would refuse an ambiguous read, but a test should not cause one).
    let instance = format!("i-test-{}", std::process::id());
    let dims = [("InstanceId", instance.as_str()), ("Environment", "test")];

    let data: Vec<MetricDatum> = SIX
        .iter()
        .map(|(name, unit, value)| {
            MetricDatum::builder()
                .metric_name(*name)
                .unit(unit.clone())
                .value(*value)
                .set_dimensions(Some(
                    dims.iter()
                        .map(|(k, v)| Dimension::builder().name(*k).value(*v).build())
                        .collect(),
                ))
                .build()
        })
        .collect();
    let client = cw.client();
    block_on(
        client
            .put_metric_data()
            .namespace(&namespace)
            .set_metric_data(Some(data))
            .send(),
    )
    .unwrap_or_else(|e| panic!("PutMetricData failed: {e:?}\n{}", cw.server_output()));

    let puts = cw.put_requests(&namespace);
    assert_eq!(puts.len(), 1, "expected one PutMetricData: {puts:?}");
    assert_eq!(puts[0].status, 200);
    assert_eq!(puts[0].metric_data, 6);

    for (name, _, value) in SIX {
        assert_eq!(
            cw.datapoints(&namespace, name, &dims),
            vec![value],
            "read back {name}"
        );
    }
    let names: Vec<String> = cw.metrics(&namespace).into_iter().map(|(n, _)| n).collect();
    let mut expected: Vec<String> = SIX.iter().map(|(n, _, _)| (*n).to_owned()).collect();
    expected.sort();
    assert_eq!(names, expected);
    // Reading back does not publish anything.
    assert_eq!(cw.put_requests(&namespace).len(), 1);
}

#[test]
fn cloudwatch_errors_come_back_typed() {
    let cw = cloudwatch();
    let namespace = unique_namespace("selftest-error");
    // Value and Values together is invalid; moto says so and the SDK must see the typed error.
    let datum = MetricDatum::builder()
        .metric_name("Bad")
        .value(1.0)
        .values(2.0)
        .build();
    let err = block_on(
        cw.client()
            .put_metric_data()
            .namespace(&namespace)
            .metric_data(datum)
            .send(),
    )
    .expect_err("moto accepted Value and Values together");
    let err = err.into_service_error();
    assert!(
        err.is_invalid_parameter_value_exception(),
        "unexpected error: {err:?}"
    );
    let puts = cw.put_requests(&namespace);
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].status, 400);
}

#[test]
fn default_chain_takes_the_role_credentials_from_imds_v2() {
    // Fake values, never printed: assertions below say what differs, not the values.
    let (role, key, secret, token) = (
        "nightcopy-test-role",
        "ASIANIGHTCOPYTEST01",
        "imds-fake-secret",
        "imds-fake-session-token",
    );
    let imds = start_imds(role, key, secret, token, "i-0abc123def4567890", "eu-west-3");

    // No process-global change: the chain reads this Env instead of the real environment, and an
    // empty Fs instead of ~/.aws, so static keys on the machine cannot leak in.
    let env_vars = imds.chain_env();
    let env_slice: Vec<(&str, &str)> = env_vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (creds, region) = block_on(async {
        let config = aws_config::defaults(BehaviorVersion::latest())
            .env(Env::from_slice(&env_slice))
            .fs(Fs::from_slice(&[]))
            .load()
            .await;
        let provider = config
            .credentials_provider()
            .expect("the default chain has a credentials provider");
        let creds = provider.provide_credentials().await;
        (creds, config.region().map(|r| r.to_string()))
    });
    let creds = creds.unwrap_or_else(|e| {
        panic!(
            "default chain loaded no credentials: {e}\nIMDS log: {:?}\n{}",
            imds.requests(),
            imds.server_output()
        )
    });
    assert!(creds.access_key_id() == key, "access key is not the role's");
    assert!(
        creds.secret_access_key() == secret,
        "secret is not the role's"
    );
    assert!(
        creds.session_token() == Some(token),
        "session token is not the role's"
    );
    assert!(creds.expiry().is_some(), "role credentials carry an expiry");
    assert_eq!(region.as_deref(), Some("eu-west-3"), "region from IMDS");

    let log = imds.requests();
    let first_put = log
        .iter()
        .position(|r| r.method == "PUT" && r.path == "/latest/api/token" && r.status == 200)
        .unwrap_or_else(|| panic!("no token PUT: {log:?}"));
    let creds_path = format!("/latest/meta-data/iam/security-credentials/{role}");
    let creds_get = log
        .iter()
        .position(|r| r.method == "GET" && r.path == creds_path && r.status == 200)
        .unwrap_or_else(|| panic!("no credentials GET: {log:?}"));
    assert!(
        first_put < creds_get,
        "token PUT after the credentials GET: {log:?}"
    );
    assert!(
        log.iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.token == "valid"),
        "a GET went without a valid token: {log:?}"
    );
}

#[test]
fn imds_refuses_requests_without_a_token() {
    let imds = start_imds("r", "AK", "SK", "TK", "i-1", "us-east-1");
    let (status, _) =
        crate::common::process::http_get(&imds.endpoint, "/latest/meta-data/instance-id")
            .expect("GET to the IMDS stand-in");
    assert_eq!(status, 401);
    let log = imds.requests();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].token, "missing");
}

#[test]
#[should_panic(expected = "moto's GetMetricData ignores the namespace")]
fn datapoints_refuses_a_read_that_moto_would_mix() {
    let cw = cloudwatch();
    let dims = [("InstanceId", "i-shared-between-namespaces")];
    let namespaces = [
        unique_namespace("selftest-mix-a"),
        unique_namespace("selftest-mix-b"),
    ];
    for ns in &namespaces {
        let datum = MetricDatum::builder()
            .metric_name("Shared")
            .value(1.0)
            .dimensions(
                Dimension::builder()
                    .name(dims[0].0)
                    .value(dims[0].1)
                    .build(),
            )
            .build();
        block_on(
            cw.client()
                .put_metric_data()
                .namespace(ns)
                .metric_data(datum)
                .send(),
        )
        .expect("PutMetricData");
    }
    cw.datapoints(&namespaces[0], "Shared", &dims);
}

#[test]
fn a_put_large_enough_to_be_gzipped_is_stored() {
    // Over the SDK's 10 KiB request-compression threshold, so the body arrives gzip-encoded.
    let cw = cloudwatch();
    let namespace = unique_namespace("selftest-gzip");
    let data: Vec<MetricDatum> = (0..400)
        .map(|i| {
            MetricDatum::builder()
                .metric_name(format!("Metric{i:03}"))
                .value(f64::from(i))
                .dimensions(
                    Dimension::builder()
                        .name("Environment")
                        .value("gzip")
                        .build(),
                )
                .build()
        })
        .collect();
    block_on(
        cw.client()
            .put_metric_data()
            .namespace(&namespace)
            .set_metric_data(Some(data))
            .send(),
    )
    .unwrap_or_else(|e| panic!("PutMetricData failed: {e:?}\n{}", cw.server_output()));
    assert_eq!(cw.metrics(&namespace).len(), 400);
    assert_eq!(
        cw.datapoints(&namespace, "Metric123", &[("Environment", "gzip")]),
        vec![123.0]
    );
}
