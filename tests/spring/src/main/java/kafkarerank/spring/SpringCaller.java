package kafkarerank.spring;

import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.springframework.kafka.core.DefaultKafkaConsumerFactory;
import org.springframework.kafka.core.DefaultKafkaProducerFactory;
import org.springframework.kafka.listener.ContainerProperties;
import org.springframework.kafka.listener.KafkaMessageListenerContainer;
import org.springframework.kafka.requestreply.ReplyingKafkaTemplate;
import org.springframework.kafka.requestreply.RequestReplyFuture;
import org.springframework.kafka.support.TopicPartitionOffset;

/**
 * Calls the rerank service the way a Spring service does: a {@code ReplyingKafkaTemplate}
 * with Spring's defaults (its header names, 16-byte binary correlation ids, the reply topic
 * taken from the reply container), each request body a JSON string.
 *
 * <pre>
 * java -cp CLASSPATH kafkarerank.spring.SpringCaller --bootstrap HOST:PORT --requests TOPIC
 *     --bodies FILE (one JSON request body a line)
 *     [--dedicated TOPIC] [--shared TOPIC] [--partitioned TOPIC:PARTITION]
 * </pre>
 *
 * <p>Each scenario sends every body and prints one JSON line per reply on stdout:
 * {@code {"scenario", "template", "topic", "partition", "headers": {name: hex}, "value"}}.
 * dedicated: one template with a reply topic of its own; shared: two templates (each its own
 * consumer group) on one reply topic, calling at the same time; partitioned: one template
 * whose reply container is assigned one partition, so the template sends
 * {@code kafka_replyPartition}. Exit status 0 only when every call got its reply.
 */
public final class SpringCaller {

    private static final Duration REPLY_TIMEOUT = Duration.ofSeconds(30);
    private static final Duration ASSIGNMENT_TIMEOUT = Duration.ofSeconds(30);

    static {
        // Spring and the Kafka client log through SLF4J: warnings and errors only, on stderr.
        System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
        System.setProperty("org.slf4j.simpleLogger.logFile", "System.err");
    }

    private SpringCaller() {
    }

    public static void main(String[] args) throws Exception {
        Map<String, String> options = parse(args);
        String bootstrap = required(options, "bootstrap");
        String requests = required(options, "requests");
        List<String> bodies = Files.readAllLines(Path.of(required(options, "bodies")));
        if (options.containsKey("dedicated")) {
            try (Caller caller = Caller.subscribed(bootstrap, options.get("dedicated"), false)) {
                callAll("dedicated", 0, caller, requests, bodies);
            }
        }
        if (options.containsKey("shared")) {
            String topic = options.get("shared");
            try (Caller first = Caller.subscribed(bootstrap, topic, true);
                    Caller second = Caller.subscribed(bootstrap, topic, true)) {
                List<Pending> pending = new ArrayList<>();
                for (String body : bodies) {
                    pending.add(new Pending(0, first.send(requests, body)));
                    pending.add(new Pending(1, second.send(requests, body)));
                }
                for (Pending call : pending) {
                    print("shared", call.template(), call.future().get(40, TimeUnit.SECONDS));
                }
            }
        }
        if (options.containsKey("partitioned")) {
            String[] topicPartition = options.get("partitioned").split(":", 2);
            int partition = Integer.parseInt(topicPartition[1]);
            try (Caller caller = Caller.assigned(bootstrap, topicPartition[0], partition)) {
                callAll("partitioned", 0, caller, requests, bodies);
            }
        }
    }

    private static void callAll(
            String scenario, int template, Caller caller, String topic, List<String> bodies)
            throws Exception {
        for (String body : bodies) {
            print(scenario, template, caller.send(topic, body).get(40, TimeUnit.SECONDS));
        }
    }

    private record Pending(int template, RequestReplyFuture<String, String, String> future) {
    }

    /** One ReplyingKafkaTemplate and its reply container. */
    private static final class Caller implements AutoCloseable {
        private final ReplyingKafkaTemplate<String, String, String> template;

        private Caller(String bootstrap, ContainerProperties properties, boolean sharedReplyTopic)
                throws InterruptedException {
            Map<String, Object> producer = new HashMap<>();
            producer.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
            producer.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class);
            producer.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class);
            Map<String, Object> consumer = new HashMap<>();
            consumer.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
            consumer.put(ConsumerConfig.GROUP_ID_CONFIG, "spring-caller-" + UUID.randomUUID());
            consumer.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
            consumer.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
            // The reply topics are made for the test: read them from the start, so that no
            // reply can slip past a container still taking up its partitions.
            consumer.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
            KafkaMessageListenerContainer<String, String> container =
                    new KafkaMessageListenerContainer<>(
                            new DefaultKafkaConsumerFactory<>(consumer), properties);
            template = new ReplyingKafkaTemplate<>(
                    new DefaultKafkaProducerFactory<>(producer), container);
            template.setSharedReplyTopic(sharedReplyTopic);
            template.setDefaultReplyTimeout(REPLY_TIMEOUT);
            template.start();
            if (properties.getTopics() != null && !template.waitForAssignment(ASSIGNMENT_TIMEOUT)) {
                throw new IllegalStateException("the reply container got no partition");
            }
        }

        static Caller subscribed(String bootstrap, String topic, boolean shared)
                throws InterruptedException {
            return new Caller(bootstrap, new ContainerProperties(topic), shared);
        }

        static Caller assigned(String bootstrap, String topic, int partition)
                throws InterruptedException {
            return new Caller(
                    bootstrap,
                    new ContainerProperties(new TopicPartitionOffset(topic, partition)),
                    false);
        }

        RequestReplyFuture<String, String, String> send(String topic, String body) {
            return template.sendAndReceive(new ProducerRecord<>(topic, body));
        }

        @Override
        public void close() {
            template.stop();
            template.destroy();
        }
    }

    private static void print(String scenario, int template, ConsumerRecord<String, String> reply) {
        StringBuilder headers = new StringBuilder();
        for (Header header : reply.headers()) {
            if (!headers.isEmpty()) {
                headers.append(", ");
            }
            String value = header.value() == null ? "null"
                    : '"' + HexFormat.of().formatHex(header.value()) + '"';
            headers.append('"').append(header.key()).append("\": ").append(value);
        }
        // The reply's value is the service's JSON, printed as it came.
        System.out.println("{\"scenario\": \"" + scenario + "\", \"template\": " + template
                + ", \"topic\": \"" + reply.topic() + "\", \"partition\": " + reply.partition()
                + ", \"headers\": {" + headers + "}, \"value\": " + reply.value() + "}");
        System.out.flush();
    }

    private static Map<String, String> parse(String[] args) {
        Map<String, String> options = new HashMap<>();
        for (int i = 0; i + 1 < args.length; i += 2) {
            if (!args[i].startsWith("--")) {
                throw new IllegalArgumentException("expected --name value, got " + args[i]);
            }
            options.put(args[i].substring(2), args[i + 1]);
        }
        return options;
    }

    private static String required(Map<String, String> options, String name) {
        String value = options.get(name);
        if (value == null) {
            throw new IllegalArgumentException("--" + name + " is required");
        }
        return value;
    }
}
