//! `serve` over a real channel (the embedded MQTT broker) with the fewest
//! messages in flight: everyone is still answered, one after another.

use std::time::Duration;

use pluto_engine::client::CoordinatorClient;
use pluto_engine::keys::MasterKey;
use pluto_plugins_api::{connect_channel, ChannelEvent, ChannelOptions, ChannelRole};
use pluto_transport_mqtt::broker::EmbeddedBroker;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_in_flight_still_serves_everyone() {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), 100, MAX_ENVELOPE).unwrap();
    let url = broker.url();
    let net = net_with(CoordinatorConfig {
        max_in_flight: 1,
        ..CoordinatorConfig::default()
    })
    .await;
    let Net { _dir, books, c } = net;
    let c = Arc::new(c);
    let channel: Arc<dyn pluto_plugins_api::ControlChannel> = connect_channel(
        &url,
        ChannelOptions {
            role: ChannelRole::Coordinator { group: None },
            max_payload: MAX_ENVELOPE,
            logins: Vec::new(),
        },
    )
    .await
    .unwrap()
    .into();
    tokio::time::timeout(Duration::from_secs(10), async {
        while channel.next_event().await != Some(ChannelEvent::Connected) {}
    })
    .await
    .expect("the coordinator's channel connects");
    let serving = tokio::spawn(pluto_coordinator::serve(c, channel.clone(), books));

    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let url = url.clone();
        clients.spawn(async move {
            let keys = MasterKey::generate().keys();
            let client = Arc::new(
                CoordinatorClient::connect(&url, &keys, None, 1000, false)
                    .await
                    .unwrap(),
            );
            let mut asks = tokio::task::JoinSet::new();
            for _ in 0..10 {
                let client = client.clone();
                asks.spawn(async move { client.request(&Message::GetStatus).await });
            }
            let mut answered = 0;
            while let Some(r) = asks.join_next().await {
                match r.unwrap().unwrap() {
                    Message::Status(s) => assert_eq!(s.offered, 1000),
                    other => panic!("{other:?}"),
                }
                answered += 1;
            }
            answered
        });
    }
    let mut answered = 0;
    while let Some(n) = tokio::time::timeout(Duration::from_secs(60), clients.join_next())
        .await
        .expect("answered in time")
    {
        answered += n.unwrap();
    }
    assert_eq!(answered, 30);
    assert!(!serving.is_finished(), "still serving");
    channel.close().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serve returns once its channel is closed");
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
}
