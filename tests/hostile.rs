//! What a hostile tenant (or a wrong answer) can put in front of the operator: it refuses or
//! contains it, keeps serving everyone else, and never takes over a Secret that is not its own.

mod support;

use std::time::{Duration, Instant};

use gcp_token_operator::{crd, names, render};
use gcp_token_operator_testkit::emulator::Endpoint;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::*;

const SA_EMAIL: &str = "builder@proj.iam.gserviceaccount.com";

async fn events_with_reason(env: &Env<'_>, reason: &str) -> usize {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let list = events.list(&ListParams::default()).await.expect("listing events");
    list.items
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count.max(1) as usize))
        .sum()
}

/// The value that panicked the operator for every tenant (`Duration` overflow) is refused, and
/// the operator goes on serving the other TokenRequests.
#[tokio::test]
async fn a_huge_duration_is_invalid_and_the_operator_serves_on() {
    let mut env = Env::new("overflow").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    env.start_operator();
    env.create("victim", impersonation_from_caller(SA_EMAIL)).await;
    env.wait_ready("victim").await;

    let patch = json!({"spec": {"refresh": {"renewBefore": "18446744073709551615s"}}});
    let refused = env
        .token_requests()
        .patch("victim", &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    // The CRD's pattern refuses it before the operator sees it.
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 422),
        "{refused:?}"
    );
    // The largest the pattern lets through is still refused by validation, without a panic.
    let patch = json!({"spec": {"refresh": {"renewBefore": "99999days"}}});
    env.token_requests()
        .patch("victim", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("a well-formed duration passes the schema");
    let tr = env.wait_reason("victim", "InvalidSpec").await;
    let message = &ready_condition(&tr).unwrap().message;
    assert!(message.contains("between 1s and 12h"), "{message}");

    env.create("bystander", impersonation_from_caller(SA_EMAIL)).await;
    env.wait_ready("bystander").await;
    let operator = env.operator.as_mut().unwrap();
    assert!(operator.get("/healthz").await.is_ok(), "the operator still answers");
    assert!(!operator.log().contains("panicked"), "{}", operator.log());
    env.assert_no_token_leaked().await;
}

/// Google answering with a token that is already expired: a failure with its own reason, backed
/// off, never Ready, and not a mint (and an Event) every second.
#[tokio::test]
async fn an_expired_answer_is_a_failure_not_a_mint_loop() {
    let mut env = Env::new("expired").await;
    env.prepare_impersonation(SA_EMAIL, Duration::ZERO).await;
    env.start_operator();
    env.create("stale", impersonation_from_caller(SA_EMAIL)).await;
    let tr = env.wait_reason("stale", "UnusableToken").await;
    assert_eq!(ready_status(&tr), Some("False"));
    assert!(fingerprint(&tr).is_none());
    let message = &ready_condition(&tr).unwrap().message;
    assert!(message.contains("less than 10s from now"), "{message}");
    let first = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let calls = env.google.calls(Endpoint::GenerateAccessToken);
    let events = events_with_reason(&env, "UnusableToken").await;
    let issued = events_with_reason(&env, "Issued").await;
    eprintln!(
        "expired answers over {:.0?}: {calls} generateAccessToken calls, {events} UnusableToken Events, {issued} Issued Events",
        first.elapsed()
    );
    // The first attempt, and at most one retry: a permanent failure backs off 30 s first.
    assert!(calls <= 2, "{calls} calls in 20 s");
    assert!(events <= 2, "{events} Events in 20 s");
    assert_eq!(issued, 0);
    let tr = env.token_requests().get("stale").await.unwrap();
    assert_eq!(ready_status(&tr), Some("False"));
    assert!(
        env.secrets().get_opt("stale").await.unwrap().is_none(),
        "no Secret for a token that was never usable"
    );

    // Once Google's answers are right again, the next attempt succeeds.
    env.google
        .set_lifetime(Endpoint::GenerateAccessToken, Duration::from_secs(3600));
    env.wait_ready("stale").await;
    env.assert_no_token_leaked().await;
}

/// Names Kubernetes admits but labels cannot hold: the Secret still comes, labelled with a hash,
/// and found by that label.
#[tokio::test]
async fn names_longer_than_a_label_get_their_secret() {
    let mut env = Env::new("long").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    env.start_operator();
    let long = format!("{}.{}", "a".repeat(120), "b".repeat(132));
    assert_eq!(long.len(), 253);
    env.create(&long, impersonation_from_caller(SA_EMAIL)).await;
    env.wait_ready(&long).await;
    let secret = env.secret(&long).await;
    let label = &secret.labels()[render::TOKEN_REQUEST_LABEL];
    assert_eq!(label, &names::fit_63(&long));
    assert!(label.len() <= 63);
    assert_eq!(secret.annotations()[render::TOKEN_REQUEST_ANNOTATION], long);
    let selector = format!("{}={label}", render::TOKEN_REQUEST_LABEL);
    let found = env
        .secrets()
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap();
    assert_eq!(found.items.len(), 1);
    assert_eq!(
        env.google.calls(Endpoint::GenerateAccessToken),
        1,
        "one mint, not one per retry"
    );
    assert_eq!(
        events_with_reason(&env, "Issued").await,
        1,
        "its Event has a valid name too"
    );
    env.assert_no_token_leaked().await;
}

/// A spec with many long invalid values: the message is cut, so the status write and the Event
/// (whose note the apiserver limits to 1 KiB) both still go through.
#[tokio::test]
async fn a_long_list_of_problems_still_reaches_status_and_events() {
    let mut env = Env::new("problems").await;
    env.start_operator();
    let long = "X".repeat(250);
    let spec = json!({
        "flow": {"impersonation": {"serviceAccount": long, "scopes": [long], "delegates": [long, long]}},
        "source": {"secret": {"name": long, "key": long}},
        "secret": {"name": long, "tokenKey": long},
    });
    env.create("noisy", spec).await;
    let tr = env.wait_reason("noisy", "InvalidSpec").await;
    let message = &ready_condition(&tr).unwrap().message;
    assert!(message.len() <= 1000, "{}", message.len());
    assert!(message.ends_with('…'), "{message}");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let deadline = Instant::now() + WAIT;
    let note = loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        if let Some(event) = list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidSpec"))
        {
            break event.note.unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "no InvalidSpec Event; log:\n{}",
            env.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(note.len() <= 1000, "{}", note.len());
    assert!(!env.operator_log().contains("publishing an event failed"));
}

/// A Secret's type is immutable: changing `spec.secret.type` replaces the Secret (a new uid)
/// instead of failing for ever, with the token it held (read back before the replacement), so
/// without a mint.
#[tokio::test]
async fn a_type_change_replaces_the_secret() {
    let mut env = Env::new("retype").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    env.start_operator();
    env.create("pull", impersonation_from_caller(SA_EMAIL)).await;
    env.wait_ready("pull").await;
    let before = env.secret("pull").await;
    assert_eq!(before.type_.as_deref(), Some("Opaque"));

    let patch = json!({"spec": {"secret": {"type": "kubernetes.io/dockerconfigjson", "registries": ["gcr.io"]}}});
    env.token_requests()
        .patch("pull", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let after = env
        .wait_secret("pull", "a dockerconfigjson Secret", |s| {
            s.type_.as_deref() == Some("kubernetes.io/dockerconfigjson")
        })
        .await;
    assert_ne!(after.uid(), before.uid());
    let tr = env.wait_ready("pull").await;
    assert_eq!(tr.status.as_ref().unwrap().failed_attempts, None);
    assert_eq!(env.google.calls(Endpoint::GenerateAccessToken), 1);
    let config = &after.data.as_ref().unwrap()[".dockerconfigjson"].0;
    assert!(String::from_utf8_lossy(config).contains(&secret_token(&before)));
    env.assert_no_token_leaked().await;
}

/// An immutable Secret of the operator's cannot take a refreshed token: it is replaced too.
#[tokio::test]
async fn an_immutable_secret_is_replaced_at_refresh() {
    let mut env = Env::new("immutable").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(20)).await;
    env.start_operator();
    env.create("frozen", impersonation_from_caller(SA_EMAIL)).await;
    let tr = env.wait_ready("frozen").await;
    let first = fingerprint(&tr).unwrap();
    let patch = json!({"immutable": true});
    env.secrets()
        .patch("frozen", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let frozen = env.secret("frozen").await;
    env.wait_tr("frozen", "a refreshed token", |tr| {
        fingerprint(tr).is_some_and(|f| f != first) && ready_status(tr) == Some("True")
    })
    .await;
    let replaced = env.secret("frozen").await;
    assert_ne!(replaced.uid(), frozen.uid());
    assert_eq!(replaced.immutable, None);
    env.assert_no_token_leaked().await;
}

/// What the operator's writes rely on: an apply that names a uid updates only the Secret with
/// that uid, and fails when the name belongs to another Secret or to none, so it cannot take over
/// a Secret that someone created after the operator looked.
#[tokio::test]
async fn an_apply_with_a_uid_only_updates_that_secret() {
    let env = Env::new("uid").await;
    let secret = |uid: Option<String>| -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "contested", "uid": uid},
            "data": {"token": "b3BlcmF0b3I="},
        }))
        .unwrap()
    };
    let params = PatchParams::apply("gcp-token-operator").force();
    let created = env
        .secrets()
        .patch("contested", &params, &Patch::Apply(&secret(None)))
        .await
        .expect("creating by apply");
    let uid = created.uid();
    env.secrets()
        .patch("contested", &params, &Patch::Apply(&secret(uid.clone())))
        .await
        .expect("the same Secret is updated");

    env.secrets()
        .delete("contested", &DeleteParams::default())
        .await
        .unwrap();
    let refused = env
        .secrets()
        .patch("contested", &params, &Patch::Apply(&secret(uid.clone())))
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 409),
        "{refused:?}"
    );
    let mut users: Secret = serde_json::from_value(json!({"metadata": {"name": "contested"}})).unwrap();
    users.data = Some([("mine".to_string(), ByteString(b"user".to_vec()))].into());
    env.secrets().create(&PostParams::default(), &users).await.unwrap();
    let refused = env
        .secrets()
        .patch("contested", &params, &Patch::Apply(&secret(uid)))
        .await;
    // A uid cannot change: the apiserver refuses the apply as invalid.
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 422),
        "{refused:?}"
    );
    let untouched = env.secret("contested").await;
    assert_eq!(untouched.data.unwrap().keys().collect::<Vec<_>>(), ["mine"]);
}

/// A rename whose first attempts fail (the new name is taken for a while) still cleans up the
/// Secret under the old name once the new one holds a token.
#[tokio::test]
async fn a_rename_after_failures_removes_the_old_secret() {
    let mut env = Env::new("rename").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    env.start_operator();
    let mut spec = impersonation_from_caller(SA_EMAIL);
    spec["secret"] = json!({"name": "old"});
    env.create("moving", spec).await;
    env.wait_ready("moving").await;
    env.put_secret("new", "mine", "user").await;
    let patch = json!({"spec": {"secret": {"name": "new"}}});
    env.token_requests()
        .patch("moving", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let tr = env.wait_reason("moving", "SecretConflict").await;
    assert_eq!(tr.status.unwrap().secret_name.as_deref(), Some("old"));
    env.secrets().delete("new", &DeleteParams::default()).await.unwrap();
    // A foreign Secret is not watched: the operator looks again within a minute, or at once when
    // asked to.
    let asked = json!({"metadata": {"annotations": {crd::REFRESH_REQUESTED_ANNOTATION: "after-delete"}}});
    env.token_requests()
        .patch("moving", &PatchParams::default(), &Patch::Merge(&asked))
        .await
        .unwrap();
    let tr = env
        .wait_tr("moving", "Ready in Secret new", |tr| {
            ready_status(tr) == Some("True") && tr.status.as_ref().unwrap().secret_name.as_deref() == Some("new")
        })
        .await;
    assert!(fingerprint(&tr).is_some());
    let log = || env.operator_log();
    gcp_token_operator_testkit::control_plane::wait_for_deletion(&env.secrets(), "old", WAIT, &log)
        .await
        .expect("the Secret under the old name goes");
    env.assert_no_token_leaked().await;
}

/// Anyone may put the operator's label on a Secret; large ones do not grow its memory: it keeps
/// only the identity of Secrets no TokenRequest controls.
#[tokio::test]
async fn labelled_secrets_of_others_do_not_fill_memory() {
    const SECRETS: usize = 100;
    const SIZE: usize = 900 * 1024;
    let mut env = Env::new("junk").await;
    env.prepare_impersonation(SA_EMAIL, Duration::from_secs(3600)).await;
    let blob = ByteString(vec![b'x'; SIZE]);
    let junk = |i: usize| -> Secret {
        let mut secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("junk-{i}"), "labels": {"app.kubernetes.io/managed-by": "gcp-token-operator"}},
        }))
        .unwrap();
        secret.data = Some([("blob".to_string(), blob.clone())].into());
        secret
    };
    // Half before the operator starts (its first list), half while it watches.
    for i in 0..SECRETS / 2 {
        env.secrets().create(&PostParams::default(), &junk(i)).await.unwrap();
    }
    env.start_operator();
    let operator = env.operator.as_ref().unwrap();
    operator.wait_ready(WAIT).await.unwrap();
    for i in SECRETS / 2..SECRETS {
        env.secrets().create(&PostParams::default(), &junk(i)).await.unwrap();
    }
    env.create("real", impersonation_from_caller(SA_EMAIL)).await;
    env.wait_ready("real").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let operator = env.operator.as_ref().unwrap();
    let peak = operator.peak_rss_kib().unwrap();
    let now = operator.rss_kib().unwrap();
    eprintln!(
        "{SECRETS} labelled Secrets of {} KiB: operator peak RSS {} MiB, RSS now {} MiB",
        SIZE / 1024,
        peak / 1024,
        now / 1024
    );
    // Holding them would take about 88 MiB; what stays is the operator's own. The peak includes
    // the first list's page of 50 whole Secrets, decoded, before trimming.
    assert!(now < 60 * 1024, "RSS {now} KiB");
    assert!(peak < 160 * 1024, "peak RSS {peak} KiB");
    env.assert_no_token_leaked().await;
}
