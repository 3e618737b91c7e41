//! The typed client (`skygate-client`) against a real control plane: every call the CLI makes
//! decodes into the shared API types, paging reads everything, refusals carry their problem
//! and request id, and an expired access token is refreshed once (the old refresh token is
//! spent, the new pair kept).

use crate::both_stores;
use crate::common::{Backend, TestApp, ED25519, PASSWORD};
use skygate_api_types::{
    AddSshKeyParams, CreateMachineParams, LoginParams, MachinePatch, MachineStatus, PageQuery,
    RegisterParams, RestartPolicy,
};
use skygate_client::{Client, ClientError, MachineAction, Tokens};

both_stores!(the_typed_client_speaks_the_whole_tenant_api);

async fn the_typed_client_speaks_the_whole_tenant_api(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.tiny_image().await;
    let mut client = Client::new(&app.base, None).unwrap();

    assert!(matches!(
        client.all_machines(None).await,
        Err(ClientError::NotLoggedIn)
    ));
    let user = client
        .register(&RegisterParams {
            username: "typed".into(),
            email: "typed@example.com".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap();
    assert_eq!(
        (user.username.as_str(), user.role.as_str()),
        ("typed", "user")
    );
    let wrong = client
        .login(&LoginParams {
            username: "typed".into(),
            password: "not the password".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.status(), Some(401));
    client
        .login(&LoginParams {
            username: "typed".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap();
    assert_eq!(client.profile().await.unwrap().user.id, user.id);
    assert_eq!(client.reconciler().await.unwrap_err().status(), Some(403));
    let root = app.admin("typed-root").await;
    let mut admin = Client::new(
        &app.base,
        Some(Tokens {
            access_token: root.access,
            refresh_token: root.refresh,
        }),
    )
    .unwrap();
    // A control plane without hosts has no finished pass yet, and says so.
    assert!(admin.reconciler().await.unwrap().last_pass.is_none());

    let key = client
        .add_ssh_key(&AddSshKeyParams {
            name: "laptop".into(),
            public_key: ED25519.into(),
        })
        .await
        .unwrap();
    assert!(key.fingerprint.starts_with("SHA256:"), "{key:?}");
    assert_eq!(client.all_ssh_keys().await.unwrap().len(), 1);

    // More machines than one page of 2 holds, read back page after page.
    for i in 0..3 {
        let m = client
            .create_machine(&CreateMachineParams {
                hostname: format!("typed-{i}"),
                image: "tiny".into(),
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 1,
                ssh_keys: vec!["laptop".into()],
                user_data: None,
                restart_policy: (i == 2).then_some(RestartPolicy::OnFailure),
                labels: [("n".to_owned(), i.to_string())].into(),
            })
            .await
            .unwrap();
        assert_eq!(m.status, MachineStatus::Pending);
        let policy = if i == 2 {
            RestartPolicy::OnFailure
        } else {
            RestartPolicy::Never
        };
        assert_eq!(m.restart_policy, policy);
    }
    // The policy is changed in place, and reads back.
    let typed_0 = m_id(&mut client, "typed-0").await;
    let patched = client
        .patch_machine(
            &typed_0,
            &MachinePatch {
                restart_policy: Some(RestartPolicy::OnFailure),
                labels: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.restart_policy, RestartPolicy::OnFailure);
    assert_eq!(
        patched.labels["n"], "0",
        "a PATCH without labels keeps them"
    );
    let mut names: Vec<String> = client
        .all_machines(None)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.hostname)
        .collect();
    names.sort();
    assert_eq!(names, ["typed-0", "typed-1", "typed-2"]);
    let first = client
        .machines(&skygate_api_types::ListMachinesQuery {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    assert!(first.next_cursor.is_some());

    // A refusal: the problem, its status and the request id, in one line.
    let id = first.items[0].id.clone();
    let refused = client
        .machine_action(&id, MachineAction::Start)
        .await
        .unwrap_err();
    let ClientError::Api(problem) = &refused else {
        panic!("{refused:?}")
    };
    assert_eq!(problem.status, 409);
    let line = refused.to_string();
    assert!(
        line.contains("HTTP 409") && line.contains("request id "),
        "{line}"
    );
    let events = client
        .machine_events(&id, &PageQuery::default())
        .await
        .unwrap();
    assert!(
        events.items.iter().any(|e| e.message.contains("requested")),
        "{events:?}"
    );

    // An access token the server does not take: the client refreshes once and goes on; the
    // refresh token it held is spent.
    let spent = client.tokens().unwrap().refresh_token.clone();
    let mut stale = Client::new(
        &app.base,
        Some(Tokens {
            access_token: "not a token".into(),
            refresh_token: spent.clone(),
        }),
    )
    .unwrap();
    assert_eq!(stale.machine(&id).await.unwrap().id, id);
    assert_ne!(stale.tokens().unwrap().refresh_token, spent);
    // The spent one is refused again (and revokes its family): the session has expired.
    let mut replay = Client::new(
        &app.base,
        Some(Tokens {
            access_token: "not a token".into(),
            refresh_token: spent,
        }),
    )
    .unwrap();
    assert!(matches!(
        replay.machine(&id).await,
        Err(ClientError::SessionExpired { .. })
    ));

    // Its access token still works until it expires; its refresh token went with the family.
    stale.delete_machine(&id).await.unwrap();

    // Logging out revokes the session: its refresh token renews nothing any more.
    let mut fresh = Client::new(&app.base, None).unwrap();
    fresh
        .login(&LoginParams {
            username: "typed".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap();
    let revoked = fresh.tokens().unwrap().refresh_token.clone();
    fresh.logout().await.unwrap();
    assert!(fresh.tokens().is_none());
    let mut after = Client::new(
        &app.base,
        Some(Tokens {
            access_token: "not a token".into(),
            refresh_token: revoked,
        }),
    )
    .unwrap();
    assert!(matches!(
        after.machine(&id).await,
        Err(ClientError::SessionExpired { .. })
    ));
    app.stop().await;
}

/// The id of the caller's machine `hostname`.
async fn m_id(client: &mut Client, hostname: &str) -> String {
    client
        .all_machines(None)
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.hostname == hostname)
        .unwrap()
        .id
}
