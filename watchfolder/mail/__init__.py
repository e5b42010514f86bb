"""Mail: composing notifications, the outbox sender and the SMTP / folder transports."""
