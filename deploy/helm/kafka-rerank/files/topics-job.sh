# The topic Job's command (bash -c): writes the Kafka client properties for SSL/SASL, then
# runs create-topics.sh (the chart's files/create-topics.sh, in $CREATE_TOPICS_SH).
# Environment: SECURITY_PROTOCOL, SASL_MECHANISM, SASL_USERNAME, SASL_PASSWORD,
# SSL_KEY_PASSWORD, TLS_DIR (ca.crt, client.crt, client.key when mounted), and what
# create-topics.sh reads.
set -euo pipefail

# A value as a .properties file reads it back (a backslash is an escape there).
prop() { printf '%s' "${1//\\/\\\\}"; }
# Text inside a JAAS "..." string.
jaas() {
    local v="${1//\\/\\\\}"
    printf '%s' "${v//\"/\\\"}"
}

if [[ "${SECURITY_PROTOCOL:-PLAINTEXT}" != PLAINTEXT ]]; then
    umask 077
    props=/tmp/client.properties
    echo "security.protocol=$SECURITY_PROTOCOL" >"$props"
    if [[ $SECURITY_PROTOCOL == SASL_* ]]; then
        case "$SASL_MECHANISM" in
        PLAIN) module=org.apache.kafka.common.security.plain.PlainLoginModule ;;
        SCRAM-SHA-256 | SCRAM-SHA-512) module=org.apache.kafka.common.security.scram.ScramLoginModule ;;
        *)
            echo "topics: unknown SASL mechanism '$SASL_MECHANISM'" >&2
            exit 2
            ;;
        esac
        echo "sasl.mechanism=$SASL_MECHANISM" >>"$props"
        jaas_config="$module required username=\"$(jaas "$SASL_USERNAME")\" password=\"$(jaas "$SASL_PASSWORD")\";"
        echo "sasl.jaas.config=$(prop "$jaas_config")" >>"$props"
    fi
    if [[ -f "${TLS_DIR:-/nonexistent}/ca.crt" ]]; then
        printf 'ssl.truststore.type=PEM\nssl.truststore.location=%s\n' "$(prop "$TLS_DIR/ca.crt")" >>"$props"
    fi
    if [[ -f "${TLS_DIR:-/nonexistent}/client.crt" ]]; then
        # A PEM key store is one file: the private key, then the certificate chain.
        cat "$TLS_DIR/client.key" "$TLS_DIR/client.crt" >/tmp/client-keystore.pem
        printf 'ssl.keystore.type=PEM\nssl.keystore.location=/tmp/client-keystore.pem\n' >>"$props"
        if [[ -n "${SSL_KEY_PASSWORD:-}" ]]; then
            echo "ssl.key.password=$(prop "$SSL_KEY_PASSWORD")" >>"$props"
        fi
    fi
    export COMMAND_CONFIG="$props"
fi

exec bash -c "$CREATE_TOPICS_SH" create-topics.sh
